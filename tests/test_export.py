"""Export to plain transformers folders and ONNX: loaded with no adaptune import, they compute
what adaptune's own model computes."""

from __future__ import annotations

import pytest
import torch

from adaptune import api
from adaptune.errors import ConfigError
from adaptune.export import export_onnx, export_transformers
from adaptune.train import run
from conftest import DATA, needs_data, tiny_config

TEXTS = ["good fun", "a bore", "so bad", "great film"]


def _batch(predictor, texts):
    return predictor.tokenizer(texts, padding=True, return_tensors="pt")


def test_classification_with_the_pooler_head_exports_as_the_standard_class(
        tiny_encoder, cls_files, tmp_path):
    import transformers

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run",
                             model={"pooling": "pooler"}, train={"max_steps": 8}))
    out, message = export_transformers(result.adapter_dir, tmp_path / "hf")
    assert "BertForSequenceClassification" in message
    ours = api.load(result.adapter_dir)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = _batch(ours, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours.model(**batch).logits,
                                   rtol=1e-4, atol=1e-5)
    pipe = transformers.pipeline("text-classification", model=str(out))
    assert [p["label"] for p in pipe(TEXTS)] == ours.predict(TEXTS)


def test_the_mean_pooling_head_is_refused_with_advice(tiny_encoder, cls_files, tmp_path):
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run"))
    with pytest.raises(ConfigError, match="mean-pools .* retrain it with model.pooling=pooler"):
        export_transformers(result.adapter_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _run_on_shared(base, tmp_path, task, dataset, n_train, n_dev, **sections):
    """A 4-step run on a few examples of a shared data set."""
    return run(tiny_config(base, "", "", tmp_path / task,
                           data={"task": task, "dataset": dataset, "train_path": "",
                                 "dev_path": "", "data_dir": str(DATA),
                                 "max_train_examples": n_train, "max_dev_examples": n_dev},
                           train={"max_steps": 4}, **sections))


@needs_data
def test_ner_exports_as_token_classification(tiny_encoder, tmp_path):
    import transformers

    result = _run_on_shared(tiny_encoder, tmp_path, "ner", "conll2003", 64, 32)
    out, _ = export_transformers(result.adapter_dir, tmp_path / "hf")
    ours = api.load(result.adapter_dir)
    plain = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    batch = _batch(ours, ["John lives in Paris", "Mary went to Rome yesterday"])
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours.model(**batch).logits,
                                   rtol=1e-4, atol=1e-5)
    assert plain.config.id2label[0] == ours.labels[0]
    # The pipeline's tag of each word's first sub-token is adaptune's tag of that word.
    words = ["John", "lives", "in", "Paris"]
    pipe = transformers.pipeline("token-classification", model=str(out), ignore_labels=[])
    tokens = pipe(" ".join(words))
    firsts = [t["entity"] for t in tokens if not t["word"].startswith("##")]
    assert firsts == ours.predict([words])[0]


@needs_data
def test_qa_exports_as_question_answering(tiny_encoder, tmp_path):
    import transformers

    result = _run_on_shared(tiny_encoder, tmp_path, "qa", "squad_v2_dev_part", 16, 4,
                            model={"max_length": 96})
    out, _ = export_transformers(result.adapter_dir, tmp_path / "hf")
    ours = api.load(result.adapter_dir)
    plain = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    batch = ours.tokenizer(["who lives there?"], ["John lives in Paris with Mary"],
                           return_tensors="pt")
    with torch.no_grad():
        got, (start, end) = plain(**batch), ours.model(**batch).logits
    torch.testing.assert_close(got.start_logits, start, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.end_logits, end, rtol=1e-4, atol=1e-5)
    # transformers 5 removed the question-answering pipeline: AutoModelForQuestionAnswering
    # is how a user loads it, and its logits are adaptune's (above).
    import transformers.pipelines as pipelines

    assert "question-answering" not in pipelines.SUPPORTED_TASKS


def test_onnx_export_matches_pytorch(tiny_encoder, cls_files, tmp_path):
    pytest.importorskip("onnxruntime")
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run", train={"max_steps": 4}))
    out, message = export_onnx(result.adapter_dir, tmp_path / "model.onnx")
    assert out.exists() and "within" in message
    import onnxruntime

    ours = api.load(result.adapter_dir)
    batch = _batch(ours, TEXTS)  # another batch size and length than the export's sample
    session = onnxruntime.InferenceSession(str(out))
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {k: batch[k].numpy() for k in names})[0]
    with torch.no_grad():
        expected = ours.model(**batch).logits.numpy()
    assert abs(got - expected).max() < 1e-4


def test_cli_export(tiny_encoder, cls_files, tmp_path, capsys):
    from adaptune import cli

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run",
                             model={"pooling": "pooler"}, train={"max_steps": 2}))
    assert cli.main(["export", str(result.output_dir), str(tmp_path / "hf")]) == 0
    assert "pipeline('text-classification'" in capsys.readouterr().out
    assert cli.main(["export", str(result.output_dir), str(tmp_path / "m.onnx"),
                     "--to", "onnx"]) == 0
    assert (tmp_path / "m.onnx").exists()


def test_summarization_exports_the_causal_lm(tiny_decoder, tmp_path):
    import json

    import transformers

    rows = [{"id": str(i), "document": f"story {i} about a fox", "summary": "fox"}
            for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run(tiny_config(tiny_decoder, str(tmp_path / "d.jsonl"), str(tmp_path / "d.jsonl"),
                             tmp_path / "run", model={"max_length": 96},
                             data={"task": "summarization", "max_dev_examples": 2},
                             generation={"max_new_tokens": 2, "prompt": "{document} tl;dr:"},
                             train={"max_steps": 2}))
    out, message = export_transformers(result.adapter_dir, tmp_path / "hf")
    assert "ForCausalLM" in message
    ours = api.load(result.adapter_dir)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    batch = ours.tokenizer(["story 3 about a fox"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours.model.backbone(**batch).logits,
                                   rtol=1e-4, atol=1e-5)
