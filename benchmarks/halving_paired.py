"""Two successive-halving schedules compared search by search, on the same cells and seeds
(issue 14): which lr each search kept, the dev score of what it kept, its closest cut and its
cost.

    python benchmarks/halving_paired.py benchmarks/results/conll_ladder/backtest \\
        benchmarks/results/conll_ladder_r2_paired [--out paired.md]

Each argument is a results folder, or the `backtest` folder inside one (then the searches are
the backtest's fresh seeds, read with the folder's grid). Only the searches both sides ran
(same model, method, rank, data fraction and seed) are compared. The lr is still chosen on the
selection split alone; dev is read only to say what the choice cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adaptune.advisor import _scaling_of, backtest_records
from adaptune.report import base_method, load_results, select_lrs
from adaptune.sweep import search_cells


def searches(path: str) -> tuple[dict[tuple, dict[str, Any]], Any]:
    """{(model, method, rank, fraction, seed): search summary with its dev value} of a results
    folder (or of its backtest), and its grid."""
    folder = Path(path)
    backtest = folder.name == "backtest"
    res = load_results(folder.parent if backtest else folder)
    g = res.grid
    if backtest:
        records = [r for r in backtest_records(folder.parent) if r.get("status") == "ok"]
        keys = {(r["axes"]["model"], r["axes"]["method"], r["axes"]["rank"],
                 r["axes"]["fraction"], r["axes"]["seed"]) for r in records}
        cells = {c.id: c for k in keys
                 for c in search_cells(g, k[0], base_method(k[1]), k[2], k[3], k[4],
                                       _scaling_of(g, k[1]))}
        selected, found = select_lrs(g, cells, [r for r in records if r["id"] in cells],
                                     res.higher_is_better)
    else:
        selected, found = res.records, res.searches
    value = {(r["axes"]["model"], r["axes"]["method"], r["axes"]["rank"], r["axes"]["fraction"],
              r["axes"]["seed"]): r["value"] for r in selected}
    out = {}
    for s in found:
        key = (s["model"], s["method"], s["rank"], s["fraction"], s["seed"])
        out[key] = {**s, "value": value[key]}
    return out, g


def sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def schedule(g: Any) -> str:
    return f"{g.rungs} rungs, eta {g.eta}" if g.rungs > 1 else "no halving"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args(argv)
    a, ga = searches(args.first)
    b, gb = searches(args.second)
    both = sorted(set(a) & set(b), key=lambda k: (k[0], k[1], k[2] or 0, k[3], k[4]))
    if not both:
        print("no search is in both folders", file=sys.stderr)
        return 2
    na, nb = schedule(ga), schedule(gb)

    def cut(s: dict[str, Any]) -> str:
        c = s.get("closest_cut")
        return "-" if c is None else f"{c[0]:.3f} at {c[1]}"

    lines = [f"Paired lr searches: A = {args.first} ({na}), B = {args.second} ({nb}).", "",
             "| model | method | rank | seed | A: lr kept | A: dev | A: closest cut | "
             "B: lr kept | B: dev | B: closest cut |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in both:
        sa, sb = a[k], b[k]
        lines.append(f"| {k[0]} | {k[1]} | {'-' if k[2] is None else k[2]} | {k[4]} | "
                     f"{sa['selected_lr']:g} | {sa['value']:.4f} | {cut(sa)} | "
                     f"{sb['selected_lr']:g} | {sb['value']:.4f} | {cut(sb)} |")
    lines += ["", "| model | method | rank | searches | A: dev mean ± sd | B: dev mean ± sd | "
              "B - A (mean of paired differences) | A: steps per search | B: steps per search |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cell in sorted({k[:4] for k in both}, key=lambda c: (c[0], c[1], c[2] or 0, c[3])):
        ks = [k for k in both if k[:4] == cell]
        va = np.array([a[k]["value"] for k in ks])
        vb = np.array([b[k]["value"] for k in ks])
        lines.append(f"| {cell[0]} | {cell[1]} | {'-' if cell[2] is None else cell[2]} | "
                     f"{len(ks)} | {va.mean():.4f} ± {sd(va):.4f} | {vb.mean():.4f} ± "
                     f"{sd(vb):.4f} | {float((vb - va).mean()):+.4f} | "
                     f"{np.mean([a[k]['steps'] for k in ks]):.0f} | "
                     f"{np.mean([b[k]['steps'] for k in ks]):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
