"""Batching that wastes little compute on padding, reproducibly.

`LengthGroupedBatches` shuffles the examples with a seed that depends on (seed, epoch), cuts the
shuffled order into "mega-batches" of `group` batches, sorts each mega-batch by length and cuts
it into batches, then shuffles the order of the batches. Each example is in exactly one batch per
epoch; the same seed and epoch give the same batches; batches hold examples of similar length, so
a batch is padded only to its own longest member. (Random batches of short sentences are about
60% padding; grouped, a few percent.)
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence


class LengthGroupedBatches:
    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int,
                 group_by_length: bool = True, group: int = 64) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.group = group
        self.epoch = 0

    # Deliberately not named `set_epoch`: accelerate calls `set_epoch(n)` with the number of
    # times *its* loader was iterated, which is wrong after a resume. The flow sets the epoch.
    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group_by_length:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        span = self.batch_size * self.group  # a multiple of the batch size: only the last
        batches = []                         # batch of the epoch can be short
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: longest first, so batches are tight and a memory problem shows at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
