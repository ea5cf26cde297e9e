"""Extractive QA: official SQuAD metrics on hand cases, the reader, windows, a short run."""

from __future__ import annotations

import json

import pytest

from adaptune.config import DataConfig
from adaptune.errors import DataError
from adaptune.tasks import qa
from adaptune.train import load_tokenizer, run
from conftest import DATA, metric_from_example_stats, needs_data, tiny_config



def test_official_normalisation_and_scores():
    assert qa.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert qa.normalize_answer("an apple and a pear") == "apple and pear"
    assert qa.exact_score("The Denver Broncos", "denver broncos") == 1
    # gold tokens: denver broncos; pred: broncos won -> P 1/2, R 1/2
    assert qa.f1_score("Denver Broncos", "Broncos won") == pytest.approx(0.5)
    assert qa.f1_score("", "") == 1.0 and qa.f1_score("", "x") == 0.0
    ex = [qa.Example("1", "q", "c", (("Denver Broncos", 0), ("Broncos", 0))),
          qa.Example("2", "q", "c", ()),
          qa.Example("3", "q", "c", (("1998", 0),))]
    m = qa.squad_metrics(ex, ["broncos", "", "in 1999"])
    # ex1: EM 1 (matches "Broncos"), F1 1; ex2: no answer, predicted none: 1, 1; ex3: 0, 0
    assert m["exact"] == pytest.approx(200 / 3) and m["f1"] == pytest.approx(200 / 3)
    assert m["HasAns_exact"] == 50.0 and m["NoAns_exact"] == 100.0


def test_answer_start_mismatch_names_the_question(tmp_path):
    bad = tmp_path / "bad.json"
    question = {"id": "q7", "question": "Where?",
                "answers": [{"text": "France", "answer_start": 3}]}
    bad.write_text(json.dumps({"data": [{"paragraphs": [
        {"context": "Paris is in France.", "qas": [question]}]}]}))
    with pytest.raises(DataError, match=r"bad\.json: question id q7: answer 'France' is not at "
                                        r"answer_start 3"):
        qa.read_squad(bad)


@needs_data
def test_squad_split_by_article_and_windows(tiny_encoder):
    cfg = DataConfig(task="qa", dataset="squad_v2_dev_part", data_dir=str(DATA))
    train, dev = qa.QaTask().load(cfg, "train", 0), qa.QaTask().load(cfg, "dev", 0)
    assert len(train) + len(dev) == 6078
    assert {ex.article for ex in train}.isdisjoint({ex.article for ex in dev})
    assert max(ex.article for ex in train) == 11
    tok = load_tokenizer(tiny_encoder)
    feats = qa.QaTask().encode(dev[:20], tok, [], max_length=128, split="dev")
    assert len(feats) > 20  # character-level tokens: every context needs several windows
    # Gold positions decode back to the gold text where the answer lies inside the window.
    for f in feats:
        ex = dev[f["_example"]]
        if f["start_positions"]:
            s, e = f["_offsets"][f["start_positions"]], f["_offsets"][f["end_positions"]]
            assert ex.context[s[0]:e[1]].lower() == ex.answers[0][0].lower()


@needs_data
def test_short_qa_run_loss_falls(tiny_encoder, tmp_path):
    cfg = tiny_config(tiny_encoder, "", "", tmp_path / "qa", model={"max_length": 96},
                      data={"task": "qa", "dataset": "squad_v2_dev_part", "train_path": "",
                            "dev_path": "", "data_dir": str(DATA), "max_train_examples": 48,
                            "max_dev_examples": 8},
                      method={"name": "full"}, train={"max_steps": 24, "eval_every": 12,
                                                      "lr": 3e-3})
    m = run(cfg).metrics
    first, last = m["evaluations"]
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert {"exact", "f1"} <= set(m["dev"])
    assert metric_from_example_stats(m, "qa") == pytest.approx(m["dev"]["f1"], abs=1e-9)
