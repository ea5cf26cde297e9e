"""Packed training against one cell at a time: cells per hour of a small CoNLL-2003 LoRA grid
(minilm-l6, 4 ranks x 2 seeds = 8 cells), the same cells either way.

    python benchmarks/packing.py [--train-examples 4000] [--packs 8,4] [--workers-arm]
        [--out runs/bench-packing]

Arms, each one `adaptune sweep` in its own subprocess (so its peak memory is its own), one
after another on a quiet machine:
  alone     one cell at a time in one process (`adaptune sweep GRID`), every core
  workers   one process per cell, two at a time (`--workers 2`), the cores split (--workers-arm)
  pack K    `--pack K`: up to K cells trained together on one copy of the base, every core
            (K=8: both seeds in one pack, two length groups a step; K=4: the four ranks of one
            seed, whose batches are the same, one group)

Prints the wall time, cells per hour and ratio, peak memory, where the time goes (data and
model setup, training steps, evaluations), the model FLOP/s of the training steps as a fraction
of the machine's measured fp32 matrix-product peak (MFU), and the dev F1 of every cell in each
arm (the backbone's own dropout draws one stream for a whole pack, so a packed cell equals its
run alone in distribution, not bit for bit: adaptune/packing.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

GRID = {
    "name": "packing-bench",
    "task": "ner",
    "dataset": "conll2003",
    "models": ["minilm-l6"],
    "methods": ["lora"],
    "ranks": [1, 4, 16, 64],
    "seeds": [0, 1],
    "overrides": {
        "model": {"max_length": 128},
        "method": {"targets": ["query", "key", "value", "dense"], "alpha": 16},
        "data": {"max_train_examples": 4000, "max_dev_examples": 1000},
        # fp32 in both arms: a pack does not run the precision probe of a run alone.
        "train": {"epochs": 1, "batch_size": 32, "lr": 2.0e-3, "log_every": 1000,
                  "precision": "fp32"},
    },
}


def sweep(grid_file: Path, out: Path, extra: list[str]) -> float:
    """One arm: a fresh sweep in a subprocess; returns its wall time."""
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "adaptune.cli", "sweep", str(grid_file), "--out",
                    str(out), *extra], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def records(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (out / "cells").glob("*.json")),
                  key=lambda r: (r["axes"]["seed"], r["axes"]["rank"]))


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def where_time_goes(rs: list[dict], wall: float, packed: bool) -> dict[str, float]:
    """Seconds of the arm in setup (data, model, process), training steps, evaluations. A pack
    shares its time: its members' longest run is the pack's."""
    if packed:
        packs: dict[tuple, list[dict]] = {}
        for r in rs:
            packs.setdefault(tuple(r["pack"]["members"]), []).append(r)
        loop = sum(max(r["run_wall_time_s"] for r in group) for group in packs.values())
        steps = sum(max(r["train_time_s"] for r in group) for group in packs.values())
    else:
        loop = sum(r["run_wall_time_s"] for r in rs)
        steps = sum(r["train_time_s"] for r in rs)
    return {"setup": wall - loop, "training steps": steps, "evaluations": loop - steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--packs", default="8,4", help="pack sizes, one arm each")
    parser.add_argument("--workers-arm", action="store_true",
                        help="also run one process per cell, two at a time")
    parser.add_argument("--out", default="runs/bench-packing")
    args = parser.parse_args()
    import torch

    from adaptune.report import training_flops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = json.loads(json.dumps(GRID))
    grid["overrides"]["data"]["max_train_examples"] = args.train_examples
    grid["overrides"]["data"]["max_dev_examples"] = args.dev_examples
    grid_file = out / "grid.json"
    grid_file.write_text(json.dumps(grid))
    arms = {"alone": []}
    if args.workers_arm:
        arms["workers"] = ["--workers", "2"]
    for k in args.packs.split(","):
        arms[f"pack {k}"] = ["--pack", k]
    peak = matmul_peak()
    results = {}
    for name, extra in arms.items():
        folder = out / name.replace(" ", "")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        wall = sweep(grid_file, folder, extra)
        rs = records(folder)
        assert len(rs) == 8 and all(r["status"] == "ok" for r in rs), f"{name}: cells missing"
        results[name] = {"wall_s": wall, "records": rs}
        print(f"{name}: {wall:.0f} s", flush=True)

    cpu = platform.processor() or platform.machine()
    print(f"\nPacked training, 8 cells of minilm-l6 CoNLL-2003 "
          f"LoRA (ranks {GRID['ranks']} x seeds {GRID['seeds']}; {args.train_examples} training "
          f"sentences, one epoch, batch 32; dev {args.dev_examples:,} sentences), {cpu} CPU, "
          f"{os.cpu_count()} cores, torch {torch.__version__}; fp32 matrix-product peak "
          f"(2048^3) {peak / 1e9:.0f} GFLOP/s.\n")
    print("| arm | wall s | cells / hour | vs alone | peak memory MB | setup s | training "
          "steps s | evaluations s | training model GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = results["alone"]["wall_s"]
    for name, r in results.items():
        rs, wall = r["records"], r["wall_s"]
        split = where_time_goes(rs, wall, name.startswith("pack"))
        flops = sum(training_flops(x) for x in rs)
        steps_s = split["training steps"] if name != "workers" else split["training steps"] / 2
        rate = flops / max(1e-9, steps_s)
        memory = max(x["peak_memory_mb"] for x in rs)
        memory_note = f"{memory:,.0f}" if name != "workers" else f"{memory:,.0f} x 2 processes"
        print(f"| {name} | {wall:.0f} | {8 * 3600 / wall:.0f} | {base / wall:.2f}x | "
              f"{memory_note} | {split['setup']:.0f} | {split['training steps']:.0f} | "
              f"{split['evaluations']:.0f} | {rate / 1e9:.1f} | {rate / peak:.1%} |")
    alone_peak = max(x["peak_memory_mb"] for x in results["alone"]["records"])
    for name in (n for n in results if n.startswith("pack")):
        k = int(name.split()[1])
        peak_k = max(x["peak_memory_mb"] for x in results[name]["records"])
        print(f"\nMemory: a {name} held {peak_k:,.0f} MB at its peak; {k} separate runs at once "
              f"would hold about {k} x {alone_peak:,.0f} = {k * alone_peak:,.0f} MB (one process "
              "each, the base loaded in each).")
    print("\nDev F1 per cell (seed, rank):\n")
    print("| arm | " + " | ".join(f"s{x['axes']['seed']} r{x['axes']['rank']}"
                                  for x in results["alone"]["records"]) + " | mean |")
    print("|---|" + "---|" * 9)
    for name, r in results.items():
        values = [x["value"] for x in r["records"]]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {statistics.mean(values):.4f} |")
    for name in (n for n in results if n != "alone"):
        diffs = [p["value"] - a["value"] for p, a in zip(results[name]["records"],
                                                          results["alone"]["records"])]
        print(f"\n{name} - alone, per cell: mean {statistics.mean(diffs):+.4f}, sample std "
              f"{statistics.stdev(diffs):.4f} (8 paired cells)")
    (out / "summary.json").write_text(json.dumps(
        {name: {"wall_s": r["wall_s"], "values": [x["value"] for x in r["records"]]}
         for name, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
