"""NER: readers on the real files, word/sub-token alignment, a short training run."""

from __future__ import annotations

import pytest

from adaptune.config import DataConfig
from adaptune.errors import DataError
from adaptune.tasks import ner
from adaptune.train import load_tokenizer, run
from conftest import DATA, metric_from_example_stats, needs_data, tiny_config

NER = ner.NerTask()



@needs_data
@pytest.mark.parametrize("name, split, sentences, tags", [
    ("conll2003", "dev", 3250, {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG",
                                "B-MISC", "I-MISC"}),
    ("wnut17", "dev", 1009, None),
    ("bc5cdr", "train", 4560, {"O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"}),
    ("sec_filings", "train", None, {"O", "I-PER", "I-ORG", "I-LOC", "I-MISC"}),
])
def test_readers_on_real_files(name, split, sentences, tags):
    examples = NER.load(DataConfig(task="ner", dataset=name, data_dir=str(DATA)), split, 0)
    if sentences:
        assert len(examples) == sentences
    seen = {t for ex in examples for t in ex.tags}
    if tags:
        assert seen == tags
    assert all(len(ex.words) == len(ex.tags) for ex in examples)


def test_wrong_column_count_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nGerman B-MISC\n")
    with pytest.raises(DataError, match=r"bad\.conll, line 4: expected 4 columns"):
        ner.read_conll(bad)
    bad.write_text("EU\tB-ORG\nrejects\tX-FOO\n")
    with pytest.raises(DataError, match=r"line 2: tag 'X-FOO' is not O or B-/I-/E-/S-TYPE"):
        ner.read_conll(bad)


def test_alignment_round_trip_and_truncated_words(tiny_encoder):
    tok = load_tokenizer(tiny_encoder)
    examples = [ner.Example(("Peter", "Blackburn", "visits", "Brussels"),
                            ("B-PER", "I-PER", "O", "B-LOC"))]
    labels = ["O", "B-LOC", "B-PER", "I-PER"]
    # Each character is a sub-token here: "Peter" has 5; the label sits on the first only.
    feats = NER.encode(examples, tok, labels, max_length=64, split="dev")
    gold_ids = feats[0]["labels"]
    assert sum(1 for x in gold_ids if x != -100) == 4
    as_predictions = [[max(x, 0) for x in gold_ids]]
    assert NER.decode(examples, feats, as_predictions, labels) == [list(examples[0].tags)]
    # Truncated: [CLS] + 14 sub-tokens + [SEP] keeps "Peter" and "Blackburn" (5 + 9).
    feats = NER.encode(examples, tok, labels, max_length=16, split="dev")
    decoded = NER.decode(examples, feats, [[max(x, 0) for x in feats[0]["labels"]]], labels)
    assert decoded == [["B-PER", "I-PER", "O", "O"]]
    # ...and the cut-off LOC entity still counts, as a miss.
    assert NER.score(examples, feats, [[max(x, 0) for x in feats[0]["labels"]]],
                     labels)["recall"] == 0.5


def _conll_config(tiny_encoder, tmp_path, **sections):
    """A few steps on 64 CoNLL-2003 training sentences, scored on 32 dev sentences."""
    return tiny_config(tiny_encoder, "", "", tmp_path / "ner",
                       data={"task": "ner", "dataset": "conll2003", "train_path": "",
                             "dev_path": "", "data_dir": str(DATA), "max_train_examples": 64,
                             "max_dev_examples": 32}, **sections)


@needs_data
def test_short_ner_run_loss_falls(tiny_encoder, tmp_path):
    cfg = _conll_config(tiny_encoder, tmp_path, method={"name": "full"},
                        train={"max_steps": 16, "eval_every": 8, "lr": 3e-3})
    m = run(cfg).metrics
    first, last = m["evaluations"]
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert set(m["dev"]) >= {"f1", "precision", "recall"}
    assert metric_from_example_stats(m, "ner") == pytest.approx(m["dev"]["f1"], abs=1e-12)


@needs_data
def test_prompt_tuning_labels_the_input_tokens_not_the_virtual_ones(tiny_encoder, tmp_path):
    import torch

    from adaptune import api
    from adaptune.train import prepare

    cfg = _conll_config(tiny_encoder, tmp_path,
                        method={"name": "prompt_tuning", "prompt_tuning": {"virtual_tokens": 7}},
                        train={"max_steps": 8, "lr": 3e-2})
    m = run(cfg).metrics
    predictor = api.load(tmp_path / "ner" / "adapter")
    p = prepare(cfg)
    batch = p.task.collate(p.dev_features[:4], predictor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = predictor.model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape  # 7 virtual positions cut
    assert prepare(cfg).evaluate(predictor.model) == pytest.approx(m["dev"], abs=1e-9)
