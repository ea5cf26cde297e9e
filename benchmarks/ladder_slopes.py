"""Size against rank across several results folders, one per rung of a depth ladder: the
descriptive log-log slopes of `protocol_answers.py`, for grids that ran each rung separately
(sst2_ladder_r3 on minilm-l6, sst2_ladder_r3_l3, sst2_ladder_r3_bge):

    python benchmarks/ladder_slopes.py benchmarks/results/sst2_ladder_r3_l3 \
        benchmarks/results/sst2_ladder_r3 benchmarks/results/sst2_ladder_r3_bge

Size slopes use the (method, rank) cells every folder has; rank slopes are per folder. Both
are plain power laws without a floor, with 95% intervals from resampling each cell's seeds: a
description of the points, not a fitted law. The folders must share the protocol (the script
refuses folders whose grids fix different settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adaptune.report import load_results
from protocol_answers import loglog_slope


class Ladder:
    """The cells of several results folders, read as one (each model in one folder)."""

    def __init__(self, folders: list[str]):
        self.parts = [load_results(f) for f in folders]
        settings = {f: json.dumps(r.grid.overrides, sort_keys=True)
                    for f, r in zip(folders, self.parts)}
        if len(set(settings.values())) > 1:
            raise SystemExit("ladder_slopes: the folders' grids fix different settings:\n"
                             + "\n".join(f"  {f}: {s}" for f, s in settings.items()))
        self.error = self.parts[0].error

    def owner(self, key: tuple) -> Any:
        return next((r for r in self.parts if r.values(key)), None)

    def values(self, key: tuple) -> list[float]:
        res = self.owner(key)
        return res.values(key) if res else []

    def first(self, key: tuple, field: str) -> Any:
        return self.owner(key).first(key, field)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    ladder = Ladder(args.folders)
    keys = {k for r in ladder.parts for k in r.groups}
    models = sorted({k[0] for k in keys}, key=lambda m: min(
        ladder.first(k, "non_embedding_params") for k in keys if k[0] == m))
    shared = sorted({k[1:] for k in keys if all((m, *k[1:]) in keys for m in models)},
                    key=str)
    size = lambda k: ladder.first(k, "non_embedding_params")  # noqa: E731
    print("| axis | cells | seeds | slope of log error [95%] |\n|---|---|---|---|")
    for method, rank, frac in shared:
        cells = [(m, method, rank, frac) for m in models]
        est = loglog_slope(ladder, cells, size, args.bootstrap)
        label = f"{method}" + (f" r={rank}" if rank else "")
        seeds = "/".join(str(len(ladder.values(c))) for c in cells)
        print(f"| size | {label}: {', '.join(models)} | {seeds} | "
              f"{est[0]:+.3f} [{est[1]:+.3f}, {est[2]:+.3f}] |")
    for model in models:
        for method in sorted({k[1] for k in keys if k[0] == model and k[2] is not None}):
            cells = sorted([k for k in keys if k[0] == model and k[1] == method],
                           key=lambda k: k[2])
            est = loglog_slope(ladder, cells, lambda k: k[2], args.bootstrap)
            seeds = "/".join(str(len(ladder.values(c))) for c in cells)
            ranks = ", ".join(f"r={c[2]}" for c in cells)
            print(f"| rank | {model} {method} ({ranks}) | {seeds} | "
                  f"{est[0]:+.3f} [{est[1]:+.3f}, {est[2]:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
