"""Length-grouped batching and the default precision."""

from __future__ import annotations

import random


import torch

from adaptune.batching import LengthGroupedBatches, eval_batches
from adaptune.train import resolve_precision


def test_every_example_once_per_epoch_and_reproducible():
    lengths = [random.Random(i).randint(3, 120) for i in range(1003)]
    sampler = LengthGroupedBatches(lengths, batch_size=16, seed=7, group=8)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003))
        assert len(batches) == len(sampler) == 63
        assert sum(len(b) < 16 for b in batches) == 1  # only the last one is short
        assert batches == LengthGroupedBatches(lengths, 16, seed=7, group=8).batches(epoch)
    assert sampler.batches(0) != sampler.batches(1)
    assert sampler.batches(0) != LengthGroupedBatches(lengths, 16, seed=8, group=8).batches(0)


def test_grouping_cuts_padding():
    lengths = [random.Random(i).randint(3, 120) for i in range(2000)]

    def padding(batches):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    grouped = padding(LengthGroupedBatches(lengths, 32, seed=1).batches(0))
    shuffled = padding(LengthGroupedBatches(lengths, 32, seed=1, group_by_length=False).batches(0))
    assert shuffled > 0.4 and grouped < 0.05


def test_eval_batches_cover_everything_longest_first():
    lengths = [5, 9, 1, 7]
    assert eval_batches(lengths, 3) == [[1, 3, 0], [2]]


def test_default_precision(monkeypatch):
    big, small = 100_000_000, 10_000_000
    assert resolve_precision("auto", "cpu", big) == "fp32"
    assert resolve_precision("bf16", "cpu", small) == "bf16"  # asked for: kept
    assert resolve_precision("fp32", "cuda", big) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda", big) == "bf16"
    assert resolve_precision("auto", "cuda", small) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve_precision("auto", "cuda", big) == "fp32"


def test_loss_weights_count_labelled_positions():
    """Each batch's mean loss is scaled by its labelled positions over the average batch's, so
    that length-grouped batches weigh every labelled token the same (as random batches do)."""
    from adaptune.train import _labelled, _labelled_in

    assert _labelled({"labels": [-100, 3, -100, 1, 0]}) == 3
    assert _labelled({"labels": 1}) == 1  # one label per example (classification)
    assert _labelled({"start_positions": 4}) == 1  # QA: one answer span per window
    tokens = torch.tensor([[-100, 2, 2, -100], [-100, 1, -100, -100]])
    assert _labelled_in({"labels": tokens, "input_ids": torch.zeros(2, 4)}) == 3.0
    assert _labelled_in({"labels": torch.tensor([0, 1, 1]), "input_ids": torch.zeros(3, 5)}) == 3
