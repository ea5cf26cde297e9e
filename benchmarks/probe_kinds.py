"""What the precision and attention probes see, batch kind by batch kind.

For one throughput job (benchmarks/throughput.py's JOBS), set up adaptune's run as usual up to
its probes, then time forward and backward passes in fp32 and bf16 autocast with sdpa and with
eager attention on: the median batch of the epoch (what the probes timed before session 24), the
median batch with padding and the median without (what they time now, weighted by their shares).
Prints one row per (kernel, batch) with both precisions and their ratio, ROUNDS times; stops
before training. Needs native bf16 (the rows are meaningless where bf16 is emulated).

    python benchmarks/probe_kinds.py --job ner --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (the jobs' definitions)

from adaptune import attention, precision  # noqa: E402


class _Measured(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="ner", choices=sorted(throughput.JOBS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ["ADAPTUNE_CACHE"] = tempfile.mkdtemp()  # nothing cached: the probe runs
    seen: dict = {}
    real_batches = precision.probe_batches

    def probe_batches(task, features, sampler, pad_token_id, device):
        seen.update(task=task, features=features, sampler=sampler, pad=pad_token_id)
        return real_batches(task, features, sampler, pad_token_id, device)

    def measure(model, batches, device, kernels=(None,), switch=None):
        epoch = seen["sampler"].batches(0)
        lengths = [max(len(seen["features"][i]["input_ids"]) for i in b) for b in epoch]
        median = sorted(range(len(epoch)), key=lambda k: lengths[k])[len(epoch) // 2]
        one = seen["task"].collate([seen["features"][i] for i in epoch[median]], seen["pad"])
        rows = [("median batch", {k: v.to(device) for k, v in one.items()}, 1.0)] + [
            ("padded" if not bool(b["attention_mask"].all()) else "unpadded", b, w)
            for b, w in batches]
        print(f"\n### {args.job}, seed {args.seed}: fp32 and bf16 passes by kernel and batch\n")
        print("| round | kernel | batch | shape | weight | fp32 ms | bf16 ms | bf16 speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for round_ in range(args.rounds):
            for kernel in attention.COMPARED:
                for name, batch, weight in rows:
                    timed = precision.time_passes(model, [(batch, 1.0)], device,
                                                  [(kernel, False), (kernel, True)],
                                                  attention.set_kernel)
                    fp32, bf16 = timed[kernel, False], timed[kernel, True]
                    print(f"| {round_ + 1} | {kernel} | {name} | "
                          f"{'x'.join(map(str, batch['input_ids'].shape))} | {weight:.3f} | "
                          f"{fp32 * 1e3:.0f} | {bf16 * 1e3:.0f} | {fp32 / bf16:.2f}x |",
                          flush=True)
        raise _Measured

    precision.probe_batches, precision.measure = probe_batches, measure
    try:
        throughput.run_adaptune(throughput.JOBS[args.job], Path(tempfile.mkdtemp()),
                                {"precision": "auto"}, args.seed)
    except _Measured:
        pass


if __name__ == "__main__":
    main()
