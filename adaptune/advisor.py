"""The rank advisor: which method and rank reach within a tolerance of the best at the fewest
trainable parameters, how sure that is, and whether it holds on seeds the grid never used.

    advise(results, model, within)   -> Advice (its confidence from the scaling noise model)
    backtest(results, model, within) -> the pick and its rivals re-run on fresh seeds
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adaptune.errors import ConfigError
from adaptune.report import Key, _label, base_method, fit_rank, load_results, ranked
from adaptune.safe_io import write_json


@dataclass(frozen=True)
class Advice:
    model: str
    method: str
    rank: int | None
    mean: float
    trainable_params: int
    best: str
    best_mean: float
    confidence: float | None  # share of simulated replications in which the choice holds
    seeds: int
    note: str
    rivals: tuple[Key, ...] = ()  # the cells a backtest re-runs beside the pick
    key: Key | None = None

    def __str__(self) -> str:
        choice = _label(self.method, self.rank)
        sure = (f"Within tolerance in {self.confidence:.0%} of simulated replications "
                "(pooled seed noise)." if self.confidence is not None else
                "No confidence figure: fewer than 3 seeds per cell.")
        return (f"{self.model}: use {choice} ({self.trainable_params:,} trainable parameters): "
                f"mean {self.mean:.4f} over {self.seeds} seed(s), against the best, {self.best}, "
                f"at {self.best_mean:.4f}. {sure} {self.note}").strip()


def _choose(means: dict[Key, float], params: dict[Key, int], sign: float,
            within: float) -> tuple[Key, Key]:
    """(the cheapest cell within `within` of the best mean, the best)."""
    best = max(means, key=lambda k: sign * means[k])
    ok = [k for k in means if sign * (means[best] - means[k]) <= within + 1e-12]
    return min(ok, key=lambda k: (params[k], -sign * means[k])), best


def same_training(a: Key, b: Key) -> bool:
    """Whether two report cells train the same model: rsLoRA's scale alpha/sqrt(r) equals
    alpha/r at r=1, so "lora r=1" and "lora+rslora r=1" are one configuration run twice (the
    grids run both, so that each scaling's series has all its ranks); a backtest re-runs one."""
    if a == b:
        return True
    scalings = {"", "rslora"}
    return (a[0], a[2], a[3]) == (b[0], b[2], b[3]) and a[2] == 1 \
        and base_method(a[1]) == base_method(b[1]) == "lora" \
        and {a[1].partition("+")[2], b[1].partition("+")[2]} <= scalings


def distinct(keys: Sequence[Key]) -> list[Key]:
    """`keys` in order, without a cell that trains the same model as an earlier one."""
    kept: list[Key] = []
    for key in keys:
        if not any(same_training(key, k) for k in kept):
            kept.append(key)
    return kept


def advise(results: str | Path, model: str, within: float = 0.01, fraction: float = 1.0,
           n_boot: int = 2000, seed: int = 0) -> Advice:
    """The configuration with the fewest trainable parameters whose mean metric is within
    `within` of the best mean for this model (at this data fraction). Its confidence comes from
    the same noise model as the laws: every cell's mean redrawn with the seed variance pooled
    over the model's cells (itself redrawn from its chi-square); the dev set is common to all
    cells and left out. No confidence figure from fewer than 3 seeds per cell."""
    res = load_results(results)
    if fraction not in res.grid.fractions:
        fraction = max(res.grid.fractions)
    sign = 1.0 if res.higher_is_better else -1.0
    options = {k: res.values(k) for k in res.groups if k[0] == model and k[3] == fraction}
    if not options:
        known = sorted({k[0] for k in res.groups})
        raise ConfigError(f"advise: no finished cells for model {model!r} in {results}; "
                          f"models with results: {', '.join(known) or 'none'}")
    params = {k: res.first(k, "trainable_params") for k in options}
    means = {k: float(np.mean(v)) for k, v in options.items()}
    chosen, best = _choose(means, params, sign, within)
    keys = list(options)
    counts = np.array([len(options[k]) for k in keys], dtype=float)
    dof = int(sum(counts - 1))
    ss = sum(float(np.sum((np.array(options[k]) - means[k]) ** 2)) for k in keys)
    confidence = None
    if min(counts) >= 3 and dof > 0:
        rng = np.random.default_rng(seed)
        s2 = ss / dof * dof / rng.chisquare(dof, size=n_boot)
        sims = np.array([means[k] for k in keys])[None, :] + \
            rng.normal(size=(n_boot, len(keys))) * np.sqrt(s2[:, None] / counts[None, :])
        i = keys.index(chosen)
        confidence = float(np.mean([sign * (row.max() if sign > 0 else row.min()) - sign * row[i]
                                    <= within + 1e-12 for row in sims]))
    note = ""
    if ranked(chosen[1]) and len(res.grid.ranks_of(base_method(chosen[1]))) > 1:
        fit = fit_rank(res, model, chosen[1], fraction, n_boot=300)
        note = (f"Rank law for {model} {chosen[1]}: {fit.describe()}."
                if fit is not None else "")
    # The rivals a backtest re-runs: the best (the tolerance's reference), and the cheapest
    # cells just outside the tolerance (fresh seeds could bring them in).
    cheaper = sorted((k for k in keys if params[k] < params[chosen]),
                     key=lambda k: -sign * means[k])
    others = distinct([chosen, best, *cheaper])[1:]  # without cells that train as another
    rivals = tuple(others[:3 if others and others[0] == best else 2])
    return Advice(model, chosen[1], chosen[2], means[chosen], params[chosen],
                  _label(best[1], best[2]), means[best], confidence, len(options[chosen]),
                  note, rivals, chosen)  # distinct() left the pick out of rivals


def backtest(results: str | Path, model: str, within: float = 0.01,
             seeds: Sequence[int] = (1000, 1001, 1002), fraction: float = 1.0) -> dict[str, Any]:
    """Re-run the advisor's pick and its rivals on seeds the grid never used, through the same
    runner (records under <results>/backtest/), and say whether the pick held: whether the
    advisor, given only the fresh seeds of those cells, picks the same one."""
    from adaptune.report import base_method
    from adaptune.sweep import search_cells, work_through

    folder = Path(results)
    res = load_results(folder)
    used = set(res.grid.seeds)
    if used & set(seeds):
        raise ConfigError(f"backtest: seeds {sorted(used & set(seeds))} are the grid's own; "
                          "choose seeds it never used")
    advice = advise(folder, model, within, fraction)
    g = res.grid
    out = folder / "backtest"
    # Each pick and rival re-run as the grid ran it: with an lr search, the whole search (on
    # the selection split) per fresh seed, so the backtest replicates the protocol, not a lr
    # chosen with the grid's seeds.
    cells = [c for k in (advice.key, *advice.rivals) for s in seeds
             for c in search_cells(g, k[0], base_method(k[1]), k[2], k[3], s,
                                   _scaling_of(g, k[1]))]
    out.mkdir(parents=True, exist_ok=True)
    work_through(g, out, label="backtest ", cells=cells)
    return summarize_backtest(folder, model, within, advice, seeds)


def _scaling_of(grid: Any, label: str) -> str | None:
    """The scaling a report method label stands for (None where the grid has no such axis)."""
    from adaptune.report import base_method

    if not grid.scalings or not grid.scalings_of(base_method(label))[0]:
        return None
    return label.split("+", 1)[1] if "+" in label else "alpha/r"


def summarize_backtest(folder: Path, model: str, within: float, advice: Advice,
                       seeds: Sequence[int]) -> dict[str, Any]:
    from adaptune.report import base_method, select_lrs
    from adaptune.sweep import search_cells

    res = load_results(folder)
    sign = 1.0 if res.higher_is_better else -1.0
    records = [json.loads(p.read_text()) for p in sorted((folder / "backtest" / "cells")
                                                           .glob("*.json"))]
    keys = (advice.key, *advice.rivals)
    g = res.grid
    if g.lrs or g.method_lrs:  # per fresh seed, the lr its own search selected
        cells = {c.id: c for k in keys for s in seeds
                 for c in search_cells(g, k[0], base_method(k[1]), k[2], k[3], s,
                                       _scaling_of(g, k[1]))}
        records, _ = select_lrs(g, cells, [{**r, "id": r["id"]} for r in records
                                           if r.get("id") in cells and r.get("status") == "ok"],
                                res.higher_is_better)
    fresh: dict[Key, list[float]] = {}
    for r in records:
        a = r["axes"]
        k = (a["model"], a["method"], a["rank"], a["fraction"])
        if k in keys and a["seed"] in seeds and r.get("status") == "ok":
            fresh.setdefault(k, []).append(r["value"])
    means = {k: float(np.mean(v)) for k, v in fresh.items()}
    params = {k: res.first(k, "trainable_params") for k in fresh}
    held = None
    if advice.key in means and len(means) == len(keys):
        held = _choose(means, params, sign, within)[0] == advice.key
    summary = {"model": model, "within": within, "pick": _label(advice.method, advice.rank),
               "pick_committed_mean": advice.mean, "pick_fresh_mean": means.get(advice.key),
               "rivals": [_label(k[1], k[2]) for k in advice.rivals],
               "fresh_means": {_label(k[1], k[2]): v for k, v in means.items()},
               "fresh_seeds": list(seeds), "held": held,
               "higher_is_better": res.higher_is_better}
    summary["within_best"] = within_best(summary)
    write_json(folder / "backtest" / f"summary-{model}.json", summary)
    return summary


def within_best(summary: dict[str, Any]) -> bool | None:
    """The advisor's promise, tested on the fresh seeds: the pick's fresh mean is within the
    tolerance of the best fresh mean among the re-run cells. Weaker than `held` (the same
    cell picked again), which fails whenever a cheaper rival moves inside the tolerance even
    though the pick itself stayed good; None until every re-run cell has its fresh seeds."""
    means = summary["fresh_means"]
    if summary["pick_fresh_mean"] is None or len(means) < 1 + len(summary["rivals"]):
        return None
    sign = 1.0 if summary.get("higher_is_better", True) else -1.0
    best = max(sign * v for v in means.values())
    return bool(best - sign * summary["pick_fresh_mean"] <= summary["within"] + 1e-12)


def load_backtests(folder: Path) -> list[dict[str, Any]]:
    path = Path(folder) / "backtest"
    return [json.loads(p.read_text()) for p in sorted(path.glob("summary-*.json"))] \
        if path.is_dir() else []


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def backtest_lines(backtests: list[dict[str, Any]]) -> list[str]:
    # Summaries written before `within_best` existed get it from their stored fresh means.
    backtests = [{**b, "within_best": within_best(b)} for b in backtests]
    decided = [b for b in backtests if b["held"] is not None]
    hits = sum(b["held"] for b in decided)
    kept = sum(bool(b["within_best"]) for b in decided)
    lines = ["## Advisor backtest on fresh seeds", "",
             f"The advisor's pick and its rivals re-run on seeds the grid never used "
             f"(`adaptune advise --backtest`): the pick stayed "
             f"within the tolerance of the best re-run cell in {kept} of {len(decided)} "
             f"models (the advisor's promise), and the pick held in {hits} of {len(decided)} "
             "models (the advisor, given only the fresh seeds, picks the same cell: stricter, "
             "it fails when a cheaper rival moves inside the tolerance).", "",
             "| model | tolerance | pick | committed mean | fresh mean | rivals (fresh means) "
             "| within tolerance of the best | same pick |", "|---|---|---|---|---|---|---|---|"]
    for b in backtests:
        rivals = ", ".join(f"{name} {b['fresh_means'].get(name, float('nan')):.4f}"
                           for name in b["rivals"])
        fresh = b["pick_fresh_mean"]
        lines.append(f"| {b['model']} | {b['within']:g} | {b['pick']} | "
                     f"{b['pick_committed_mean']:.4f} | "
                     f"{'-' if fresh is None else f'{fresh:.4f}'} | {rivals} | "
                     f"{_yes_no(b['within_best'])} | {_yes_no(b['held'])} |")
    return lines + [""]
