"""The questions of the tuned-lr protocol (issue 14), answered from a results folder with
intervals, from the same records and analysis as `adaptune report`:

    python benchmarks/protocol_answers.py benchmarks/results/sst2_ladder [--out answers.md]

- at tuned lr and convergence, is LoRA r=1 within noise of r=64 (each scaling, each model)?
- does rsLoRA differ from alpha/r at high rank, and does the selected lr move with the rank?
- how far is BitFit from full fine-tuning (and head-only from both)?
- the size exponent within one lineage and the rank exponents, with their held-out checks.

Differences are means over seeds with a 95% Welch interval; "within noise" means the interval
contains 0. Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from adaptune.report import (fit_all, held_out_coverage, load_results, ranked, reference_rank,
                             welch_p)


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """mean(b) - mean(a) and its 95% Welch interval; None with fewer than 2 seeds a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff, se = float(np.mean(b) - np.mean(a)), math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, dof)) * se
    return diff, diff - half, diff + half


def compare(res, label: str, a_key, b_key) -> str:
    a, b = res.values(a_key), res.values(b_key)
    if not a or not b:
        return f"| {label} | - | - | - | not run yet |"
    ci = welch_interval(a, b)
    p = welch_p(a, b)
    means = f"{np.mean(a):.4f} (n={len(a)}) -> {np.mean(b):.4f} (n={len(b)})"
    if ci is None:
        return f"| {label} | {means} | {np.mean(b) - np.mean(a):+.4f} | - | fewer than 2 seeds |"
    diff, lo, hi = ci
    verdict = "within noise" if lo <= 0 <= hi else ("higher" if diff > 0 else "lower")
    p_text = f"{p:.3f}" if p is not None else "-"
    return f"| {label} | {means} | {diff:+.4f} [{lo:+.4f}, {hi:+.4f}] | {p_text} | {verdict} |"


def loglog_slope(res, keys: list, x_of, n_boot: int,
                 seed: int = 0) -> tuple[float, float, float] | None:
    """The least-squares slope of log(error) on log(x) over the cells' seed means, with a 95%
    percentile interval from resampling each cell's seeds (a plain power law, no floor: a
    description of the points, not a law; with a floor the true exponent is steeper). None
    with fewer than 2 cells of at least 2 seeds."""
    cells = [(x_of(k), [res.error(v) for v in res.values(k)]) for k in keys if res.values(k)]
    if len(cells) < 2 or any(len(errs) < 2 for _, errs in cells):
        return None
    logx = np.log([x for x, _ in cells])

    def slope(means: list[float]) -> float:
        return float(np.polyfit(logx, np.log(means), 1)[0])

    point = slope([np.mean(errs) for _, errs in cells])
    rng = np.random.default_rng(seed)
    boots = [slope([np.mean(rng.choice(errs, size=len(errs))) for _, errs in cells])
             for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def slope_row(res, axis: str, label: str, keys: list, x_of, n_boot: int) -> str:
    found = [k for k in keys if res.values(k)]
    est = loglog_slope(res, found, x_of, n_boot)
    text = (f"{est[0]:+.3f} [{est[1]:+.3f}, {est[2]:+.3f}] ({len(found)} points, x from "
            f"{x_of(found[0]):g} to {x_of(found[-1]):g})" if est else
            "not enough cells with 2 or more seeds")
    return f"| {axis} | {label} | {text} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--out", default="")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    res = load_results(args.results)
    frac = max(res.grid.fractions)
    lines = [f"# {res.grid.name}: the tuned-lr protocol's questions", "",
             f"From `{args.results}` ({len(res.records)} cells; "
             f"`python benchmarks/protocol_answers.py {args.results}`). Dev {res.metric}; "
             "differences are later minus earlier, with a 95% Welch interval over seeds.", "",
             "| comparison | means | difference [95%] | Welch p | reading |",
             "|---|---|---|---|---|"]
    ranks = sorted(res.grid.ranks_of("lora"))
    for model in res.grid.models:
        for method in [m for m in res.methods if m.startswith("lora")]:
            lines.append(compare(res, f"{model} {method}: r={ranks[0]} -> r={ranks[-1]}",
                                 (model, method, ranks[0], frac),
                                 (model, method, ranks[-1], frac)))
        if "lora+rslora" in res.methods:
            lines.append(compare(res, f"{model} r={ranks[-1]}: alpha/r -> rsLoRA",
                                 (model, "lora", ranks[-1], frac),
                                 (model, "lora+rslora", ranks[-1], frac)))
        lines.append(compare(res, f"{model}: BitFit -> full", (model, "bitfit", None, frac),
                             (model, "full", None, frac)))
        lines.append(compare(res, f"{model}: head -> BitFit", (model, "head", None, frac),
                             (model, "bitfit", None, frac)))
    lines += ["", "## Selected learning rates by rank (median over seeds)", "",
              "With alpha fixed, alpha/r shrinks the update as the rank grows, so its best lr "
              "should grow with the rank; rsLoRA's should move less.", "",
              "| model | method | " + " | ".join(f"r={r}" for r in ranks) + " |",
              "|---|---|" + "---|" * len(ranks)]
    chosen: dict[tuple, list[float]] = {}
    for s in res.searches:
        chosen.setdefault((s["model"], s["method"], s["rank"]), []).append(s["selected_lr"])
    for model in res.grid.models:
        for method in [m for m in res.methods if m.startswith("lora")]:
            cells = [f"{np.median(chosen[(model, method, r)]):g}" if (model, method, r) in chosen
                     else "-" for r in ranks]
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    fits = fit_all(res, args.bootstrap) if res.records else {}
    lines += ["", "## Exponents", ""]
    for axis in ("size", "rank"):
        for name, fit in fits.get(axis, {}).items():
            lines.append(f"- {axis} law, {name}: {fit.describe()}")
    lines += ["", "## Log-log slopes (descriptive)", "",
              "The slope of log(1 - metric) on log(x) over the cells' seed means, with a 95% "
              "interval from resampling seeds: a plain power law without a floor, so it "
              "describes the points and is not a fitted law (there is no held-out check, and "
              "with an irreducible floor the law's exponent is steeper). Size: x = the "
              "backbone's non-embedding parameters; rank: x = the LoRA rank.", "",
              "| axis | cells | slope [95%] |", "|---|---|---|"]
    ref = reference_rank(res)  # the rank the report's size laws use
    if len(res.grid.models) > 1:
        for method in res.methods:
            rank = ref if ranked(method) else None
            keys = sorted([(m, method, rank, frac) for m in res.grid.models
                           if res.values((m, method, rank, frac))],
                          key=lambda k: res.first(k, "non_embedding_params"))
            label = (f"{method} r={rank}" if rank else method) + ": " + ", ".join(
                k[0] for k in keys)
            lines.append(slope_row(res, "size", label, keys,
                                   lambda k: res.first(k, "non_embedding_params"),
                                   args.bootstrap))
    for model in res.grid.models:
        for method in [m for m in res.methods if ranked(m)]:
            lines.append(slope_row(res, "rank", f"{model} {method}",
                                   [(model, method, r, frac) for r in ranks],
                                   lambda k: k[2], args.bootstrap))
    covered, checked = held_out_coverage(fits) if fits else (0, 0)
    lines += ["", f"Held-out cells inside their law's 95% band: {covered} of {checked}"
              + (f" ({covered / checked:.0%})" if checked else "") + ".", ""]
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
