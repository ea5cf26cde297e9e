"""Reports and advice from a sweep's results folder (see adaptune.sweep).

    write_report(results, out)  -> report.md, results.csv, fits.json and PNG plots
    advise(results, model, within) -> which method and rank reach within `within` of the best at
                                      the fewest trainable parameters, and how sure that is

Only cells of the folder's own grid are read (grid.json); cells left over from an edited grid,
cells still missing and cells that failed are listed, never averaged in.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from adaptune.errors import ConfigError
from adaptune.safe_io import write_json
from adaptune.scaling import Fit, fit_joint_law, fit_power_law
from adaptune.methods import RANKED_METHODS
from adaptune.sweep import expand, grid_from_dict

Key = tuple[str, str, Any, float]  # (model, method, rank, fraction)


@dataclass
class Results:
    grid: Any
    higher_is_better: bool
    records: list[dict[str, Any]]  # status "ok", cells of this grid only
    skipped: list[dict[str, Any]]
    missing: list[str]
    failed: list[str]
    stale: list[str]
    groups: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.records:
            a = r["axes"]
            self.groups.setdefault((a["model"], a["method"], a["rank"], a["fraction"]),
                                   []).append(r)

    @property
    def metric(self) -> str:
        return self.records[0]["metric"] if self.records else "metric"

    def error(self, value: float) -> float:
        """What the scaling laws fit: 1 - metric for accuracy-like metrics, else the metric."""
        return 1.0 - value if self.higher_is_better else value

    def values(self, key: Key) -> list[float]:
        return [r["value"] for r in self.groups.get(key, [])]

    def first(self, key: Key, field_name: str) -> Any:
        return self.groups[key][0][field_name]


def load_results(folder: str | Path) -> Results:
    from adaptune.tasks import task_class

    folder = Path(folder)
    grid_file = folder / "grid.json"
    if not grid_file.is_file():
        raise ConfigError(f"{folder}: not a results folder of `adaptune sweep` (no grid.json)")
    grid = grid_from_dict(json.loads(grid_file.read_text()), where=str(grid_file))
    cells, _ = expand(grid)
    ids = {c.id for c in cells}
    records, skipped, stale = [], [], []
    for path in sorted((folder / "cells").glob("*.json")):
        if path.stem not in ids:
            stale.append(path.stem)
            continue
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        (records if record.get("status") == "ok" else skipped).append(record)
    done = {r["id"] for r in records + skipped}
    failed = sorted(p.stem for p in (folder / "failed").glob("*.json") if p.stem in ids)
    missing = sorted(ids - done - set(failed))
    return Results(grid, task_class(grid.task).higher_is_better, records, skipped, missing,
                   failed, stale)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _rank_label(rank: Any) -> str:
    return "-" if rank is None else str(rank)


# ----------------------------------------------------------------------------------------------
# Fits.


def reference_rank(res: Results) -> int | None:
    """The rank at which size and data laws are fitted for ranked methods: 8 if the grid has
    it (the common default), else the middle of its ranks."""
    ranks = sorted(res.grid.ranks)
    return 8 if 8 in ranks else ranks[len(ranks) // 2]


def fit_all(res: Results, n_boot: int = 1000) -> dict[str, dict[str, Fit]]:
    """Every law the folder's axes allow: size (per method), rank (per model and ranked
    method), data (per model, method, rank) and joint size x data (per method, rank)."""
    fits: dict[str, dict[str, Fit]] = {"size": {}, "rank": {}, "data": {}, "joint": {}}
    g = res.grid
    ref = reference_rank(res)
    full_fraction = max(g.fractions)

    def gather(keys: Iterable[Key], x_of) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for key in keys:
            for r in res.groups.get(key, []):
                xs.append(float(x_of(r)))
                ys.append(res.error(r["value"]))
        return xs, ys

    for method in g.methods:
        rank = ref if method in RANKED_METHODS else None
        if len(g.models) > 1:
            keys = [(m, method, rank, full_fraction) for m in g.models]
            x, y = gather(keys, lambda r: r["non_embedding_params"])
            if x:
                fits["size"][_label(method, rank)] = fit_power_law(x, y, n_boot=n_boot)
        if len(g.fractions) > 1:
            for model in g.models:
                keys = [(model, method, rank, f) for f in g.fractions]
                x, y = gather(keys, lambda r: r["train_examples"])
                if x:
                    fits["data"][f"{model} {_label(method, rank)}"] = \
                        fit_power_law(x, y, n_boot=n_boot)
            if len(g.models) > 1:
                n, d, y = [], [], []
                for model in g.models:
                    for f in g.fractions:
                        for r in res.groups.get((model, method, rank, f), []):
                            n.append(r["non_embedding_params"])
                            d.append(r["train_examples"])
                            y.append(res.error(r["value"]))
                if y:
                    fits["joint"][_label(method, rank)] = fit_joint_law(
                        n, d, y, n_boot=max(100, n_boot // 2))
        if method in RANKED_METHODS and len(g.ranks) > 1:
            for model in g.models:
                fit = fit_rank(res, model, method, full_fraction, n_boot)
                if fit is not None:
                    fits["rank"][f"{model} {method}"] = fit
    return fits


def _label(method: str, rank: int | None) -> str:
    return f"{method} r={rank}" if rank is not None else method


def fits_to_json(fits: dict[str, dict[str, Fit]]) -> dict[str, Any]:
    return {axis: {name: {"form": f.form, "params": f.params,
                          "intervals_95": {k: list(v) for k, v in f.intervals.items()},
                          "x0": list(f.x0), "points": f.n_points, "rmse": f.rmse,
                          "p_flat": f.p_flat, "verdict": f.verdict}
                   for name, f in by_name.items()}
            for axis, by_name in fits.items()}


# ----------------------------------------------------------------------------------------------
# Which axis pays most.


def axis_gains(res: Results) -> list[dict[str, Any]]:
    """Metric gained along each axis, between its smallest and largest setting, per doubling
    of the parameters that axis adds and per million added parameters. Size adds frozen base
    parameters (non-embedding); rank and method add trainable ones."""
    g = res.grid
    ref = reference_rank(res)
    frac = max(g.fractions)
    rows = []

    def add(axis: str, what: str, lo: Key, hi: Key, lo_params: float, hi_params: float) -> None:
        if not (res.values(lo) and res.values(hi)) or hi_params <= lo_params:
            return
        (m_lo, s_lo), (m_hi, s_hi) = _mean_std(res.values(lo)), _mean_std(res.values(hi))
        gain = m_hi - m_lo
        se = math.sqrt(s_lo**2 / len(res.values(lo)) + s_hi**2 / len(res.values(hi)))
        rows.append({"axis": axis, "what": what, "gain": gain, "gain_se": se,
                     "added_params": hi_params - lo_params,
                     "per_doubling": gain / math.log2(hi_params / lo_params),
                     "per_million": gain / ((hi_params - lo_params) / 1e6)})

    sizes = [m for m in g.models if any(k[0] == m for k in res.groups)]
    if len(sizes) > 1:
        for method in g.methods:
            rank = ref if method in RANKED_METHODS else None
            keys = [(m, method, rank, frac) for m in sizes if res.values((m, method, rank, frac))]
            if len(keys) > 1:
                keys.sort(key=lambda k: res.first(k, "non_embedding_params"))
                add("base-model size", f"{_label(method, rank)}: {keys[0][0]} -> {keys[-1][0]}",
                    keys[0], keys[-1], res.first(keys[0], "non_embedding_params"),
                    res.first(keys[-1], "non_embedding_params"))
    for model in g.models:
        for method in RANKED_METHODS:
            keys = [(model, method, r, frac) for r in sorted(g.ranks)
                    if res.values((model, method, r, frac))]
            if len(keys) > 1:
                add("rank", f"{model} {method}: r={keys[0][2]} -> r={keys[-1][2]}", keys[0],
                    keys[-1], res.first(keys[0], "trainable_params"),
                    res.first(keys[-1], "trainable_params"))
        lo, hi = (model, "head", None, frac), (model, "full", None, frac)
        if res.values(lo) and res.values(hi):
            add("method", f"{model}: head -> full", lo, hi, res.first(lo, "trainable_params"),
                res.first(hi, "trainable_params"))
    return rows


# ----------------------------------------------------------------------------------------------
# The report.


def summary_rows(res: Results) -> list[dict[str, Any]]:
    rows = []
    for key, recs in sorted(res.groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3])):
        mean, std = _mean_std([r["value"] for r in recs])
        rows.append({"model": key[0], "method": key[1], "rank": key[2], "fraction": key[3],
                     "seeds": len(recs), "mean": mean, "std": std,
                     "trainable_params": recs[0]["trainable_params"],
                     "non_embedding_params": recs[0]["non_embedding_params"],
                     "train_examples": recs[0]["train_examples"],
                     "tokens_seen": recs[0]["tokens_seen"],
                     "wall_time_s": float(np.mean([r["wall_time_s"] for r in recs]))})
    return rows


def write_report(results: str | Path, out: str | Path | None = None, n_boot: int = 1000) -> str:
    """Write report.md, results.csv, fits.json and plots/*.png; returns the report's path."""
    res = load_results(results)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(res)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    fits = fit_all(res, n_boot) if res.records else {}
    write_json(out / "fits.json", fits_to_json(fits) if fits else {})
    plots = make_plots(res, out / "plots") if res.records else []
    text = render_markdown(res, rows, fits, axis_gains(res) if res.records else [], plots, out)
    (out / "report.md").write_text(text)
    return str(out / "report.md")


def render_markdown(res: Results, rows: list[dict[str, Any]], fits: dict[str, dict[str, Fit]],
                    gains: list[dict[str, Any]], plots: list[Path], out: Path) -> str:
    g = res.grid
    devices = sorted({r.get("device", "?") for r in res.records})
    commits = sorted({(r.get("code_version") or {}).get("commit") or "?" for r in res.records})
    lines = [f"# {g.name}: {g.task} on {g.dataset or 'own data'}", "",
             "Produced by `adaptune report` from the cells in this folder; do not edit by hand.",
             "",
             f"- cells: {len(res.records)} done, {len(res.skipped)} not applicable, "
             f"{len(res.failed)} failed, {len(res.missing)} not run"
             + (f", {len(res.stale)} stale (from an edited grid, ignored)" if res.stale else ""),
             f"- device(s): {', '.join(devices) or '-'}; "
             f"code: {', '.join(c[:10] for c in commits)}",
             f"- metric: dev {res.metric} (mean ± sample std over seeds); fits are on error = "
             f"{'1 - ' if res.higher_is_better else ''}{res.metric}",
             f"- fixed settings: `{json.dumps(dict(g.overrides), sort_keys=True)}`"
             + (f"; per method: `{json.dumps(dict(g.method_overrides), sort_keys=True)}`"
                if g.method_overrides else ""), ""]
    for s in res.skipped:
        lines.append(f"- not applicable: {s['id']}: {s['reason']}")
    for name in res.failed:
        lines.append(f"- failed: {name} (failed/{name}.json)")
    if res.missing:
        lines.append(f"- not run: {', '.join(res.missing[:12])}"
                     + (f" and {len(res.missing) - 12} more" if len(res.missing) > 12 else ""))
    lines += ["", "## Results", "",
              "| model | non-emb params | method | rank | data | seeds | "
              f"{res.metric} | trainable | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['non_embedding_params'] / 1e6:.1f}M | {r['method']} | "
                     f"{_rank_label(r['rank'])} | {r['train_examples']:,} | {r['seeds']} | "
                     f"{r['mean']:.4f} ± {r['std']:.4f} | {r['trainable_params']:,} | "
                     f"{r['wall_time_s']:.0f} |")
    if fits:
        lines += ["", "## Scaling-law fits", "",
                  "95% bootstrap intervals over seeds in brackets. x0 is the smallest x: A is the "
                  "reducible error there. A law is printed only where the data support it.", ""]
        names = {"size": "base-model size N (non-embedding parameters)", "rank": "LoRA rank r",
                 "data": "training examples D", "joint": "joint, size N x data D"}
        for axis, by_name in fits.items():
            if not by_name:
                continue
            lines += [f"**{names[axis]}**", ""]
            for name, fit in by_name.items():
                lines.append(f"- {name}: {fit.describe()}")
            lines.append("")
    if gains:
        lines += ["## Which axis buys the most", "",
                  "Metric gained from the smallest to the largest setting of each axis (± standard"
                  " error over seeds), per doubling of the parameters that axis adds and per "
                  "million added parameters (size adds frozen base parameters, rank and method "
                  "trainable ones).", "",
                  "| axis | from -> to | gain | added params | per doubling | per million |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(gains, key=lambda r: -r["per_doubling"]):
            lines.append(f"| {r['axis']} | {r['what']} | {r['gain']:+.4f} ± {r['gain_se']:.4f} "
                         f"| {r['added_params']:,.0f} | {r['per_doubling']:+.4f} | "
                         f"{r['per_million']:+.4f} |")
        lines += ["", verdict_on_axes(gains), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})"
                                      for p in plots] + [""]
    return "\n".join(lines)


def verdict_on_axes(gains: list[dict[str, Any]]) -> str:
    """One sentence: the axis with the largest significant gain per doubling, and per parameter."""
    significant = [r for r in gains if r["gain"] > 2 * r["gain_se"]]
    if not significant:
        return "No axis gives a gain larger than twice its standard error at this budget."
    by_doubling = max(significant, key=lambda r: r["per_doubling"])
    by_param = max(significant, key=lambda r: r["per_million"])
    flat = sorted({r["axis"] for r in gains} - {r["axis"] for r in significant})
    text = (f"Per doubling of parameters, {by_doubling['axis']} pays most "
            f"({by_doubling['what']}: {by_doubling['per_doubling']:+.4f}); per added parameter, "
            f"{by_param['axis']} ({by_param['what']}: {by_param['per_million']:+.4f} per million).")
    if flat:
        text += f" No significant gain along: {', '.join(flat)}."
    return text


# ----------------------------------------------------------------------------------------------
# Plots.


def make_plots(res: Results, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    g = res.grid
    frac = max(g.fractions)
    ref = reference_rank(res)
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=90)
        plt.close(fig)
        made.append(folder / f"{name}.png")

    def point(key: Key) -> tuple[float, float] | None:
        vals = res.values(key)
        return _mean_std(vals) if vals else None

    def line(ax, pts: list[tuple[float, float, float]], label: str) -> None:
        """(x, mean, std) points as one line with error bars, in x order."""
        if pts:
            x, mean, std = zip(*sorted(pts))
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)

    # 1. metric against trainable parameters, per method (one panel per model).
    budgets = {(k[1], k[2]) for k in res.groups}
    fig, axes = plt.subplots(1, len(g.models), figsize=(5 * len(g.models), 4), squeeze=False)
    for ax, model in zip(axes[0], g.models if len(budgets) > 1 else []):
        for method in g.methods:
            ranks = g.ranks if method in RANKED_METHODS else [None]
            line(ax, [(res.first(k, "trainable_params"), *point(k)) for r in ranks
                      if point(k := (model, method, r, frac))], method)
        ax.set(xscale="log", xlabel="trainable parameters", ylabel=res.metric, title=model)
        ax.legend(fontsize=8)
    if len(budgets) > 1:
        save(fig, "metric_vs_trainable_params")
    else:
        plt.close(fig)

    # 2. metric against rank, one line per base model (a panel per ranked method).
    ranked = [m for m in g.methods if m in RANKED_METHODS]
    if ranked and len(g.ranks) > 1:
        fig, axes = plt.subplots(1, len(ranked), figsize=(5 * len(ranked), 4), squeeze=False)
        for ax, method in zip(axes[0], ranked):
            for model in g.models:
                line(ax, [(r, *point(k)) for r in g.ranks
                          if point(k := (model, method, r, frac))], model)
            ax.set(xscale="log", xlabel="rank", ylabel=res.metric, title=method)
            ax.set_xticks(sorted(g.ranks), [str(r) for r in sorted(g.ranks)])
            ax.legend(fontsize=8)
        save(fig, "metric_vs_rank")

    # 3. metric against base-model size, one line per method.
    if len(g.models) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in g.methods:
            rank = ref if method in RANKED_METHODS else None
            line(ax, [(res.first(k, "non_embedding_params"), *point(k)) for m in g.models
                      if point(k := (m, method, rank, frac))], _label(method, rank))
        ax.set(xscale="log", xlabel="base model non-embedding parameters", ylabel=res.metric)
        ax.legend(fontsize=8)
        save(fig, "metric_vs_model_size")

    # 4. size x rank heat map (LoRA, else the first ranked method).
    if ranked and len(g.ranks) > 1:
        method = "lora" if "lora" in ranked else ranked[0]
        ranks = sorted(g.ranks)
        grid = np.full((len(g.models), len(ranks)), np.nan)
        for i, model in enumerate(g.models):
            for j, r in enumerate(ranks):
                if p := point((model, method, r, frac)):
                    grid[i, j] = p[0]
        fig, ax = plt.subplots(figsize=(1.2 * len(ranks) + 2, 0.8 * len(g.models) + 1.5))
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_yticks(range(len(g.models)), list(g.models))
        ax.set(xlabel=f"{method} rank", title=f"{res.metric}: base model x rank")
        fig.colorbar(image)
        save(fig, "size_x_rank_heatmap")

    # 5. metric against training examples, where the grid sweeps data.
    if len(g.fractions) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in g.models:
            for method in g.methods:
                rank = ref if method in RANKED_METHODS else None
                line(ax, [(res.first(k, "train_examples"), *point(k)) for f in g.fractions
                          if point(k := (model, method, rank, f))],
                     f"{model} {_label(method, rank)}")
        ax.set(xscale="log", xlabel="training examples", ylabel=res.metric)
        ax.legend(fontsize=8)
        save(fig, "metric_vs_data")
    return made


# ----------------------------------------------------------------------------------------------
# The rank advisor.


@dataclass(frozen=True)
class Advice:
    model: str
    method: str
    rank: int | None
    mean: float
    trainable_params: int
    best: str
    best_mean: float
    confidence: float  # share of bootstrap resamples in which the choice is within tolerance
    seeds: int
    note: str

    def __str__(self) -> str:
        choice = _label(self.method, self.rank)
        return (f"{self.model}: use {choice} ({self.trainable_params:,} trainable parameters): "
                f"mean {self.mean:.4f} over {self.seeds} seed(s), against the best, {self.best}, "
                f"at {self.best_mean:.4f}. Within tolerance in {self.confidence:.0%} of "
                f"bootstrap resamples over seeds. {self.note}").strip()


def advise(results: str | Path, model: str, within: float = 0.01, fraction: float = 1.0,
           n_boot: int = 2000, seed: int = 0) -> Advice:
    """The configuration with the fewest trainable parameters whose mean metric is within
    `within` of the best mean for this model (at this data fraction)."""
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

    def choose(means: dict[Key, float]) -> tuple[Key, Key]:
        best = max(means, key=lambda k: sign * means[k])
        ok = [k for k in means if sign * (means[best] - means[k]) <= within + 1e-12]
        return min(ok, key=lambda k: (params[k], -sign * means[k])), best

    means = {k: float(np.mean(v)) for k, v in options.items()}
    chosen, best = choose(means)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_boot):
        resampled = {k: float(np.mean(rng.choice(v, size=len(v)))) for k, v in options.items()}
        top = max(resampled.values(), key=lambda v: sign * v)
        hits += sign * (top - resampled[chosen]) <= within + 1e-12
    note = ""
    if chosen[1] in RANKED_METHODS and len(res.grid.ranks) > 1:
        fit = fit_rank(res, model, chosen[1], fraction, n_boot=500)
        note = (f"Rank law for {model} {chosen[1]}: {fit.describe()}."
                if fit is not None else "")
    if len(options[chosen]) < 2:
        note += " One seed only: the confidence is not meaningful."
    return Advice(model, chosen[1], chosen[2], means[chosen], params[chosen],
                  _label(best[1], best[2]), means[best], hits / n_boot, len(options[chosen]),
                  note)


def fit_rank(res: Results, model: str, method: str, fraction: float,
             n_boot: int = 1000) -> Fit | None:
    """The rank law of one model and ranked method at one data fraction (None: no cells)."""
    x, y = [], []
    for r in res.grid.ranks:
        for rec in res.groups.get((model, method, r, fraction), []):
            x.append(r)
            y.append(res.error(rec["value"]))
    return fit_power_law(x, y, n_boot=n_boot) if x else None
