"""Summarization on a tiny decoder: readers, loss masking, generation, ROUGE on hand cases."""

from __future__ import annotations

import json

import pytest

from adaptune.config import DataConfig
from adaptune.errors import ConfigError, DataError
from adaptune.tasks import summarization as summ
from adaptune.train import load_tokenizer, run
from conftest import DATA, metric_from_example_stats, needs_data, tiny_config



def test_rouge_hand_cases():
    # Identical: 100. "the cat sat" vs "the cat ran": unigram overlap 2/3 -> R1 F 66.67;
    # bigrams: {the cat} shared of 2 -> 50; LCS "the cat" = 2/3.
    m = summ.rouge(["the cat sat", "the cat sat"], [("the cat sat",), ("the cat ran",)])
    assert m["rouge1"] == pytest.approx((100 + 200 / 3) / 2)
    assert m["rouge2"] == pytest.approx((100 + 50) / 2)
    assert m["rougeL"] == pytest.approx((100 + 200 / 3) / 2)
    # Several references: the best one counts; stemming makes "running" match "runs".
    assert summ.rouge(["dogs running"], [("cats sleep", "dog runs")])["rouge1"] == 100.0


@needs_data
@pytest.mark.parametrize("name, split, count, refs", [
    ("scitldr", "dev", 619, 1), ("dialogsum", "dev", 500, 3), ("xsum", "train", 799, 1),
])
@pytest.mark.filterwarnings("ignore:.*empty document")
def test_readers_on_real_files(name, split, count, refs):
    examples = summ.SummarizationTask().load(
        DataConfig(task="summarization", dataset=name, data_dir=str(DATA)), split, 0)
    assert len(examples) == count
    assert min(len(ex.references) for ex in examples) >= refs


def test_empty_summary_target_names_file_and_id(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a1", "document": "text", "summary": "ok"}) + "\n"
                   + json.dumps({"id": "b2", "document": "text", "summary": " "}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: id b2: empty summary target"):
        summ.read_jsonl(bad, "xsum")


def test_loss_counts_only_summary_tokens(tiny_decoder):
    tok = load_tokenizer(tiny_decoder)
    ex = [summ.Example("1", "a long document about cats", ("cats",))]
    from adaptune.config import GenerationConfig

    task = summ.SummarizationTask(GenerationConfig(prompt="{document} tl;dr:", max_new_tokens=8))
    feat = task.encode(ex, tok, [], 96, "train")[0]
    scored = [t for t, label in zip(feat["input_ids"], feat["labels"]) if label != -100]
    assert tok.decode(scored[:-1]).replace(" ", "") == "cats"
    assert scored[-1] == tok.eos_token_id
    dev = task.encode(ex, tok, [], 96, "dev")[0]
    assert "labels" not in dev and dev["input_ids"] == feat["input_ids"][:len(dev["input_ids"])]


def test_short_run_trains_and_generates(tiny_decoder, tmp_path):
    docs = tmp_path / "train.jsonl"
    rows = [{"id": str(i), "document": f"story number {i} about a red fox", "summary": "red fox"}
            for i in range(24)]
    docs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tiny_config(tiny_decoder, str(docs), str(docs), tmp_path / "s",
                      model={"max_length": 96},
                      data={"task": "summarization", "max_dev_examples": 4},
                      generation={"max_new_tokens": 8, "num_beams": 2,
                                  "prompt": "{document} tl;dr:"},
                      method={"name": "lora", "rank": 4, "targets": ["all-linear"]},
                      train={"max_steps": 30, "eval_every": 15, "lr": 2e-2})
    m = run(cfg).metrics
    first, last = m["evaluations"]
    # Every summary is "red fox": a run that learns generates it (ROUGE-L 100 at seeds 42, 1
    # and 2; the untrained model scores 0) and its windowed train loss falls by about 0.18
    # (4.86-4.89 -> 4.68-4.69). At lr 5e-2 it did not learn at all (5.10 -> 5.02, ROUGE 0), and
    # a bare `last < first` on those two noisy losses failed on a fresh machine.
    assert last["train_loss"] < first["train_loss"] - 0.05
    assert m["dev"]["rougeL"] >= 50.0
    assert metric_from_example_stats(m, "summarization") == pytest.approx(m["dev"]["rougeL"],
                                                                          abs=1e-9)
    assert set(m["dev"]) == {"rouge1", "rouge2", "rougeL"}
    # LoRA only, rank 4 on q, k, v, o, gate, up, down (in + out: 64, 48, 48, 64, 96, 96, 96)
    # in 2 layers; the decoder's lm_head must not be caught by the task head's
    # modules_to_save (regression: it was, and trained a full copy of the output layer).
    assert m["trainable_params"] == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)


def test_encoder_and_head_only_are_refused(tiny_encoder, tiny_decoder, tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"id": "1", "document": "x y z", "summary": "x"}) + "\n")
    cfg = tiny_config(tiny_encoder, str(docs), str(docs), tmp_path / "a",
                      data={"task": "summarization"}, model={"max_length": 96},
                      generation={"prompt": "{document}:"})
    with pytest.raises(ConfigError, match="decoder-only"):
        run(cfg)
    cfg = tiny_config(tiny_decoder, str(docs), str(docs), tmp_path / "b",
                      data={"task": "summarization"}, method={"name": "head"},
                      model={"max_length": 96}, generation={"prompt": "{document}:"})
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        run(cfg)
