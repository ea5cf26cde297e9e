"""Metrics on hand-computed cases."""

from __future__ import annotations

import pytest

from adaptune.tasks.classification import classification_metrics
from adaptune.tasks.ner import conlleval


def test_conlleval_iob2_exact_and_partial_matches():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold chunks: PER(0-1), LOC(3), ORG(0); predicted: PER(0-1), ORG(3), ORG(0); correct 2
    m = conlleval(gold, pred)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["f1_PER"] == 1.0 and m["f1_LOC"] == 0.0
    assert m["f1_ORG"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P 1/2, R 1/1


def test_conlleval_boundary_errors_do_not_count():
    gold = [["B-PER", "I-PER", "I-PER"]]
    pred = [["B-PER", "I-PER", "O"]]
    assert conlleval(gold, pred)["f1"] == 0.0


def test_conlleval_io_tags_and_i_without_b():
    # IO scheme (SEC filings): a run of I-X is one entity; a type change starts another.
    gold = [["I-ORG", "I-ORG", "O", "I-PER", "I-LOC"]]
    pred = [["I-ORG", "I-ORG", "O", "I-PER", "I-PER"]]
    m = conlleval(gold, pred)
    # gold: ORG(0-1), PER(3), LOC(4); predicted: ORG(0-1), PER(3-4) -> 1 correct
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)
    # Malformed IOB2: an I- with no B- starts a chunk (as conlleval does).
    assert conlleval([["O", "I-MISC", "I-MISC"]], [["O", "B-MISC", "I-MISC"]])["f1"] == 1.0


def test_conlleval_adjacent_b_tags_and_no_entities():
    gold = [["B-LOC", "B-LOC", "O"]]
    pred = [["B-LOC", "I-LOC", "O"]]
    m = conlleval(gold, pred)  # gold: 2 one-word LOCs; pred: one two-word LOC
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    m = conlleval([["O", "O"]], [["O", "O"]])
    assert m["f1"] == 0.0 and m["precision"] == 0.0


def test_classification_accuracy_and_macro_f1():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    m = classification_metrics(gold, pred, num_labels=4)  # label 3: no support, never predicted
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: 0 -> mean 1.3/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
