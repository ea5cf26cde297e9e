"""`datasets` in: Dataset / DatasetDict objects through the API, parquet, arrow and save_to_disk
files through the config, trained the same as the equivalent TSV or CoNLL file."""

from __future__ import annotations

import pytest

import adaptune
from adaptune.errors import ConfigError, DataError
from adaptune.train import run
from conftest import tiny_config

datasets = pytest.importorskip("datasets")


def _rows(tsv: str) -> dict:
    lines = open(tsv).read().splitlines()[1:]
    texts, labels = zip(*(line.split("\t") for line in lines if line))
    return {"text": list(texts), "label": [int(x) for x in labels]}


def _dev_metrics(result):
    """Dev scores and the training loss: equal only if the same examples trained the same."""
    return [v for _, v in sorted(result.metrics["dev"].items())] + [
        result.metrics["final_train_loss"]]


def test_a_dataset_and_a_parquet_file_train_as_the_tsv(tiny_encoder, cls_files, tmp_path):
    train, dev = cls_files
    reference = run(tiny_config(tiny_encoder, train, dev, tmp_path / "tsv"))
    train_table = datasets.Dataset.from_dict(_rows(train))
    dev_table = datasets.Dataset.from_dict(_rows(dev))
    base = tiny_config(tiny_encoder, train, dev, tmp_path / "unused")
    from_api = adaptune.finetune(tiny_encoder, task="classification", dataset=train_table,
                                 dev_dataset=dev_table, config=base,
                                 output_dir=str(tmp_path / "api"))
    assert _dev_metrics(from_api) == pytest.approx(_dev_metrics(reference))
    as_dict = adaptune.finetune(tiny_encoder, dataset=datasets.DatasetDict(
        {"train": train_table, "validation": dev_table}), config=base,
        output_dir=str(tmp_path / "dict"))
    assert _dev_metrics(as_dict) == pytest.approx(_dev_metrics(reference))
    train_table.to_parquet(str(tmp_path / "train.parquet"))
    dev_table.to_parquet(str(tmp_path / "dev.parquet"))
    parquet = run(tiny_config(tiny_encoder, str(tmp_path / "train.parquet"),
                              str(tmp_path / "dev.parquet"), tmp_path / "pq"))
    assert _dev_metrics(parquet) == pytest.approx(_dev_metrics(reference))


def test_class_label_tags_train_as_the_conll_file(tiny_encoder, tmp_path):
    sentences = [(["John", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"]),
                 (["Mary", "left", "Rome"], ["B-PER", "O", "B-LOC"]),
                 (["the", "cat", "sat"], ["O", "O", "O"])] * 4
    conll = tmp_path / "train.conll"
    conll.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(ws, ts))
                                 for ws, ts in sentences) + "\n")
    names = ["O", "B-PER", "B-LOC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    table = datasets.Dataset.from_dict(
        {"tokens": [ws for ws, _ in sentences],
         "ner_tags": [[names.index(t) for t in ts] for _, ts in sentences]}, features=features)
    table.save_to_disk(str(tmp_path / "table"))
    common = {"data": {"task": "ner"}}
    reference = run(tiny_config(tiny_encoder, str(conll), str(conll), tmp_path / "conll",
                                **common))
    from_disk = run(tiny_config(tiny_encoder, str(tmp_path / "table"), str(tmp_path / "table"),
                                tmp_path / "disk", **common))
    assert _dev_metrics(from_disk) == pytest.approx(_dev_metrics(reference))


def test_table_errors_name_the_file_and_the_column(tiny_encoder, cls_files, tmp_path):
    train, dev = cls_files
    datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]}).to_parquet(
        str(tmp_path / "bad.parquet"))
    cfg = tiny_config(tiny_encoder, str(tmp_path / "bad.parquet"), dev, tmp_path / "x")
    with pytest.raises(DataError, match=r"bad.parquet: has no column 'text' \(columns: "
                                        r"sentence, label\); name it with data.text_field"):
        run(cfg)
    with pytest.raises(ConfigError, match="needs a 'train' and a 'validation'"):
        adaptune.finetune(tiny_encoder, dataset=datasets.DatasetDict(
            {"train": datasets.Dataset.from_dict(_rows(train)),
             "test": datasets.Dataset.from_dict(_rows(dev))}))
    assert not (tmp_path / "x").exists()


def test_qa_and_summarization_tables_read_as_their_files(tiny_encoder, tiny_decoder, tmp_path):
    import json

    context = "John lives in Paris with Mary."
    squad = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{i}", "question": "Where does John live?",
         "answers": [{"text": "Paris", "answer_start": 14}]} for i in range(8)]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    flat = datasets.Dataset.from_dict({
        "id": [f"q{i}" for i in range(8)], "question": ["Where does John live?"] * 8,
        "context": [context] * 8, "answers": [{"text": ["Paris"], "answer_start": [14]}] * 8})
    flat.to_parquet(str(tmp_path / "squad.parquet"))
    qa = {"data": {"task": "qa"}, "model": {"max_length": 48}}
    reference = run(tiny_config(tiny_encoder, str(tmp_path / "squad.json"),
                                str(tmp_path / "squad.json"), tmp_path / "qa-json", **qa))
    table = run(tiny_config(tiny_encoder, str(tmp_path / "squad.parquet"),
                            str(tmp_path / "squad.parquet"), tmp_path / "qa-pq", **qa))
    assert _dev_metrics(table) == pytest.approx(_dev_metrics(reference))

    rows = [{"id": str(i), "document": f"story number {i} about a red fox", "summary": "red fox"}
            for i in range(12)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "docs.parquet"))
    summ = {"data": {"task": "summarization", "max_dev_examples": 2},
            "model": {"max_length": 96},
            "generation": {"max_new_tokens": 4, "prompt": "{document} tl;dr:"},
            "train": {"max_steps": 2}}
    reference = run(tiny_config(tiny_decoder, str(tmp_path / "docs.jsonl"),
                                str(tmp_path / "docs.jsonl"), tmp_path / "s-jsonl", **summ))
    table = run(tiny_config(tiny_decoder, str(tmp_path / "docs.parquet"),
                            str(tmp_path / "docs.parquet"), tmp_path / "s-pq", **summ))
    assert _dev_metrics(table) == pytest.approx(_dev_metrics(reference))
