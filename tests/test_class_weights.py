"""data.class_weights=balanced: each training example's loss weighted by its class's rarity."""

from __future__ import annotations

import pytest
import torch

from adaptune.config import compose
from adaptune.errors import ConfigError
from adaptune.tasks.classification import balanced_weights, weighted_cross_entropy
from adaptune.train import prepare, run
from conftest import tiny_config


def test_balanced_weights_make_every_class_weigh_the_same():
    labels = ["a"] * 6 + ["b"] * 3 + ["c"]
    w = balanced_weights(labels)
    assert w == pytest.approx({"a": 10 / 18, "b": 10 / 9, "c": 10 / 3})
    totals = {c: w[c] * labels.count(c) for c in w}
    assert totals == pytest.approx({c: 10 / 3 for c in w})  # n / k each


def test_weighted_loss_equals_torchs_class_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 0, 0, 1, 2])
    per_class = torch.tensor([0.5, 2.0, 3.0])
    ours = weighted_cross_entropy(logits, labels, per_class[labels])
    theirs = torch.nn.functional.cross_entropy(logits, labels, weight=per_class)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert weighted_cross_entropy(logits, labels, None).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.fixture
def skewed_files(tmp_path):
    rows = ["good fun\t1"] * 3 + [f"bad mess {i}\t0" for i in range(9)]
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    dev.write_text("text\tlabel\ngood fun\t1\nbad mess\t0\n")
    return str(train), str(dev)


def test_only_training_features_carry_class_weights(tiny_encoder, skewed_files, tmp_path):
    cfg = tiny_config(tiny_encoder, *skewed_files, tmp_path / "w",
                      data={"class_weights": "balanced"})
    p = prepare(cfg)
    by_label = {f["labels"]: f["class_weight"] for f in p.train_features}
    assert by_label == pytest.approx({p.labels.index("1"): 12 / 6, p.labels.index("0"): 12 / 18})
    assert all("class_weight" not in f for f in p.dev_features)
    plain = prepare(tiny_config(tiny_encoder, *skewed_files, tmp_path / "p"))
    assert all("class_weight" not in f for f in plain.train_features)
    # The option trains end to end and changes the loss (same seed, same batches).
    weighted_loss = run(cfg).metrics["final_train_loss"]
    plain_loss = run(tiny_config(tiny_encoder, *skewed_files, tmp_path / "p")).metrics[
        "final_train_loss"]
    assert abs(weighted_loss - plain_loss) > 1e-4


def test_class_weights_are_a_classification_option():
    with pytest.raises(ConfigError, match="data.class_weights: expected none for "
                                          "data.task=ner"):
        compose({"data": {"task": "ner", "dataset": "conll2003", "class_weights": "balanced"}})
    with pytest.raises(ConfigError, match="data.class_weights: expected one of none, balanced"):
        compose({"data": {"class_weights": "inverse"}})
