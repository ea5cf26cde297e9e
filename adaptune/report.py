"""Reports and advice from a sweep's results folder (see adaptune.sweep).

    load_results(results)       -> the folder's records of its own grid
    write_report(results, out)  -> report.md, report.html, results.csv, fits.json, PNG plots

The rank advisor, which reads the same results, is adaptune.advisor.

Only cells of the folder's own grid are read (grid.json), including records an older adaptune
wrote under other ids (matched by their settings); cells left over from an edited grid, cells
still missing and cells that failed are listed, never averaged in. The statistics (noise
model, lack-of-fit and held-out checks, when a law counts as supported) are in
adaptune.scaling.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from adaptune.errors import ConfigError
from adaptune.safe_io import write_json
from adaptune.scaling import (DevStats, Fit, binomial_var, fit_joint_law, fit_power_law,
                              format_p)
from adaptune.methods import RANKED_METHODS
from adaptune.sweep import (cell_states, expand, finished, grid_from_dict, selection_score,
                            survivors)

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
    # Fields whose default changed since some cells ran: {field: {value then: [cell ids]}}.
    drift: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    cells: dict[str, Any] = field(default_factory=dict)  # the grid's cells by id
    # One per cell of an lr search: the lr selected, what was tried, the steps it cost.
    searches: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.records:
            a = r["axes"]
            self.groups.setdefault((a["model"], a["method"], a["rank"], a["fraction"]),
                                   []).append(r)

    @property
    def methods(self) -> list[str]:
        """The grid's methods as the report shows them: with a scaling axis, each scaling of a
        method that has one is a method of its own ("lora", "lora+rslora")."""
        out = []
        for m in self.grid.methods:
            out += [method_label(m, s) for s in self.grid.scalings_of(m)]
        return out

    @property
    def metric(self) -> str:
        return self.records[0]["metric"] if self.records else "metric"

    def error(self, value: float) -> float:
        """What the scaling laws fit: 1 - metric for accuracy-like metrics (on the metric's own
        scale: QA F1 and ROUGE run to 100), else the metric."""
        return 1.0 - value / self.task.metric_scale if self.higher_is_better else value

    @functools.cached_property
    def task(self) -> Any:
        from adaptune.tasks import task_class

        return task_class(self.grid.task)()

    def dev_stats(self, records: list[dict[str, Any]]) -> DevStats | None:
        """The records' per-example dev statistics for resampling, if every one has them (on
        the same dev examples)."""
        stats = [r.get("dev_example_stats") for r in records]
        if not stats or any(not s for s in stats) or len({len(s) for s in stats}) != 1:
            return None
        task = self.task
        return DevStats([np.asarray(s, dtype=float) for s in stats], task.metric_from_stats,
                        self.error)

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
    by_id = {c.id: c for c in cells}
    higher = task_class(grid.task).higher_is_better
    found = finished(folder, cells)  # also records of older versions, matched by settings
    records, skipped, drift = [], [], {}
    for cell_id, (path, record) in sorted(found.items()):
        record = {**record, "id": cell_id}
        (records if record.get("status") == "ok" else skipped).append(record)
        for name, (then, now) in by_id[cell_id].default_drift(record).items():
            drift.setdefault(name, {}).setdefault(json.dumps(then), []).append(cell_id)
    kept = {path for path, _ in found.values()}
    stale = sorted(p.stem for p in (folder / "cells").glob("*.json") if p not in kept)
    failed = sorted(p.stem for p in (folder / "failed").glob("*.json") if p.stem in ids)
    states = cell_states(grid, cells, folder, found)  # the records read once, above
    missing = sorted(i for i in ids - set(found) - set(failed) if states[i] != "pruned")
    searches: list[dict[str, Any]] = []
    if grid.lrs or grid.method_lrs:
        records, searches = select_lrs(grid, by_id, records, higher)
    return Results(grid, higher, records, skipped, missing, failed, stale, drift=drift,
                   cells=by_id, searches=searches)


def select_lrs(grid: Any, cells: dict[str, Any], records: list[dict[str, Any]],
               higher: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per cell of an lr search, the record of its selected lr: the best selection-split score
    among the lrs that reached the last rung (dev is not looked at). A cell whose last rung is
    not complete is left out. Returns (selected records, one summary per search); a selected
    record's axes lose lr and rung, and the method of a scaling axis reads "lora+rslora", so
    the rest of the report treats each (method, scaling) as a method."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(cells[record["id"]].group(), []).append(record)
    last = grid.rungs - 1
    selected, searches = [], []
    for key, group in groups.items():
        cell = cells[group[0]["id"]]
        finals = [r for r in group if r["axes"].get("rung") == last]
        expected = len(grid.lrs_of(cell.method))
        n_final = math.ceil(expected / grid.eta ** last) if last else expected
        if len(finals) < n_final:
            continue
        best = max(finals, key=lambda r: selection_score(r, higher))
        axes = {k: v for k, v in best["axes"].items() if k not in ("lr", "rung", "scaling")}
        if cell.scaling is not None:
            axes["method"] = method_label(cell.method, cell.scaling)
        selected.append({**best, "axes": axes, "selected_lr": best["axes"]["lr"]})
        searches.append({
            "model": cell.model, "method": axes["method"], "rank": cell.rank,
            "fraction": cell.fraction, "seed": cell.seed, "selected_lr": best["axes"]["lr"],
            # Each lr is one run continued rung to rung: its cost is its last rung's steps.
            "steps": sum(max(r.get("optimizer_steps") or 0 for r in group
                             if r["axes"]["lr"] == lr) for lr in {r["axes"]["lr"] for r in group}),
            "steps_without_halving": expected * (best.get("planned_steps") or 0),
            "tried": {r["axes"]["lr"]: (r["axes"]["rung"], r["selection"][r["metric"]])
                      for r in sorted(group, key=lambda r: r["axes"]["rung"])},
            "closest_cut": closest_cut(group, grid.eta, higher)})
    return selected, searches


def closest_cut(group: list[dict[str, Any]], eta: int,
                higher: bool) -> tuple[float, int] | None:
    """Of one lr search's records, its narrowest cut: the smallest selection-score gap between
    the worst lr a rung kept and the best lr it cut, and the optimizer step it was decided at,
    as (gap, step); None without a cut. A search whose lr was decided by a small gap at an early
    step is one that a fresh seed may decide the other way (conll_ladder's backtest: full
    fine-tuning kept an lr 3-4 F1 points worse at step 21 or 63 of 189 on 3 of 6 fresh seeds)."""
    by_rung: dict[int, dict[float, dict[str, Any]]] = {}
    for r in group:
        by_rung.setdefault(r["axes"]["rung"], {})[r["axes"]["lr"]] = r
    cuts = []
    for rung in sorted(by_rung)[:-1]:
        arms = by_rung[rung]
        kept = survivors(arms, eta, higher)
        scores = {lr: selection_score(r, higher) for lr, r in arms.items()}
        worst_kept = min((scores[lr] for lr in kept), default=None)
        # An exact tie (two lrs at the same score, mostly an F1 of 0 before any entity is
        # predicted) was settled by the tie-break, the smaller lr, not by a measurement.
        cut = [scores[lr] for lr in arms if lr not in kept and scores[lr] is not None
               and scores[lr] != worst_kept]
        if worst_kept is not None and cut:
            step = max(r.get("optimizer_steps") or 0 for r in arms.values())
            cuts.append((worst_kept - max(cut), step))
    return min(cuts) if cuts else None


def method_label(method: str, scaling: str | None) -> str:
    """A (method, scaling) pair as one method of the report: "lora" or "lora+rslora"."""
    return method if scaling in (None, "alpha/r") else f"{method}+{scaling}"


def base_method(label: str) -> str:
    return label.split("+", 1)[0]


def ranked(label: str) -> bool:
    """Whether the rank axis applies to a report method ("lora+rslora" included)."""
    return base_method(label) in RANKED_METHODS


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


def lineage_of(res: Results, model: str) -> str:
    from adaptune import zoo

    return res.grid.lineages.get(model) or zoo.lineage(model)


def dev_var(res: Results, record: dict[str, Any]) -> float:
    """Sampling variance of a record's dev metric from the finite dev set (binomial, for
    metrics in [0, 1]; none for perplexity-like metrics)."""
    value, n = record["value"] / res.task.metric_scale, record.get("dev_examples") or 0
    if not res.higher_is_better or not 0.0 <= value <= 1.0 or not n:
        return 0.0
    return binomial_var(value, n)


def gather(res: Results, keys: Iterable[Key], *x_of) -> tuple[list, list[float], list[float],
                                                             DevStats | None]:
    """One series' per-seed observations: x (one value, or a tuple for joint laws), error and
    dev-set variance; and the per-example dev statistics where every record has them."""
    xs, ys, vs, records = [], [], [], []
    for key in keys:
        for r in res.groups.get(key, []):
            x = tuple(float(f(r)) for f in x_of)
            xs.append(x if len(x) > 1 else x[0])
            ys.append(res.error(r["value"]))
            vs.append(dev_var(res, r))
            records.append(r)
    return xs, ys, vs, res.dev_stats(records)


def fit_all(res: Results, n_boot: int = 1000) -> dict[str, dict[str, Fit]]:
    """Every law the folder's axes allow: size (per method, within one lineage), rank and
    trainable parameters (per model and ranked method), data (per model, method, rank) and both
    joint size x data forms (per method, rank)."""
    fits: dict[str, dict[str, Fit]] = {"size": {}, "rank": {}, "trainable": {}, "data": {},
                                       "joint": {}, "additive": {}}
    g = res.grid
    ref = reference_rank(res)
    full_fraction = max(g.fractions)

    lineages = {lineage_of(res, m) for m in g.models}
    across = (f"descriptive only: the sizes span {len(lineages)} lineages "
              f"({', '.join(sorted(lineages))}): across architectures and training recipes "
              "the points are not one scaling law")
    for method in res.methods:
        rank = ref if ranked(method) else None
        label = _label(method, rank)
        if len(g.models) > 1:
            keys = [(m, method, rank, full_fraction) for m in g.models]
            x, y, v, dev = gather(res, keys, lambda r: r["non_embedding_params"])
            if x:
                fit = fit_power_law(x, y, dev_var=v, dev=dev, n_boot=n_boot)
                fits["size"][label] = fit if len(lineages) == 1 else _descriptive(fit, across)
        if len(g.fractions) > 1:
            for model in g.models:
                keys = [(model, method, rank, f) for f in g.fractions]
                x, y, v, dev = gather(res, keys, lambda r: r["train_examples"])
                if x:
                    fits["data"][f"{model} {label}"] = fit_power_law(
                        x, y, dev_var=v, dev=dev, n_boot=n_boot)
            if len(g.models) > 1:
                keys = [(m, method, rank, f) for m in g.models for f in g.fractions]
                x, y, v, dev = gather(res, keys, lambda r: r["non_embedding_params"],
                                      lambda r: r["train_examples"])
                if y:
                    for form in ("joint", "additive"):
                        fit = fit_joint_law([k[0] for k in x], [k[1] for k in x], y, form=form,
                                            dev_var=v, dev=dev, n_boot=max(100, n_boot // 2))
                        fits[form][label] = fit if len(lineages) == 1 else \
                            _descriptive(fit, across)
        if ranked(method) and len(g.ranks_of(base_method(method))) > 1:
            for model in g.models:
                fit = fit_rank(res, model, method, full_fraction, n_boot)
                if fit is not None:
                    fits["rank"][f"{model} {method}"] = fit
                keys = [(model, method, r, full_fraction)
                        for r in g.ranks_of(base_method(method))]
                x, y, v, dev = gather(res, keys, lambda r: r["trainable_params"])
                if x:
                    fits["trainable"][f"{model} {method}"] = fit_power_law(
                        x, y, dev_var=v, dev=dev, n_boot=n_boot)
    return fits


def _descriptive(fit: Fit, why: str) -> Fit:
    return Fit(**{**fit.__dict__, "verdict": why})


def _label(method: str, rank: int | None) -> str:
    return f"{method} r={rank}" if rank is not None else method


def fits_to_json(fits: dict[str, dict[str, Fit]]) -> dict[str, Any]:
    return {axis: {name: {"form": f.form, "params": f.params,
                          "intervals_95": {k: list(v) for k, v in f.intervals.items()},
                          "x0": list(f.x0), "points": f.n_points, "rmse": f.rmse,
                          "p_flat": f.p_flat, "p_lack_of_fit": f.p_lack_of_fit,
                          "noise": f.noise, "verdict": f.verdict,
                          "e_sensitivity": {k: list(v) for k, v in f.e_sensitivity.items()},
                          "held_out": [{"x": list(h.x), "observed": h.observed,
                                        "predicted": h.predicted, "band_95": list(h.band),
                                        "covered": h.covered} for h in f.held_out]}
                   for name, f in by_name.items()}
            for axis, by_name in fits.items()}


def held_out_coverage(fits: dict[str, dict[str, Fit]]) -> tuple[int, int]:
    """(held-out cells inside their law's 95% band, held-out cells checked), over every law
    with an interval, supported or not (descriptive laws left out)."""
    checks = [h for by_name in fits.values() for f in by_name.values()
              if not f.verdict.startswith("descriptive") for h in f.held_out]
    return sum(h.covered for h in checks), len(checks)


# ----------------------------------------------------------------------------------------------
# Which axis pays most.


def axis_gains(res: Results) -> list[dict[str, Any]]:
    """Metric gained along each axis, between its smallest and largest setting, per doubling
    of the parameters that axis adds and per million added parameters, with a Welch t test
    over seeds (no p-value from fewer than 3 seeds a side). Size adds frozen base parameters
    (non-embedding); rank and method add trainable ones."""
    g = res.grid
    ref = reference_rank(res)
    frac = max(g.fractions)
    rows = []

    def add(axis: str, what: str, lo: Key, hi: Key, lo_params: float, hi_params: float) -> None:
        a, b = res.values(lo), res.values(hi)
        if not (a and b) or hi_params <= lo_params:
            return
        (m_lo, s_lo), (m_hi, s_hi) = _mean_std(a), _mean_std(b)
        gain = m_hi - m_lo
        se = math.sqrt(s_lo**2 / len(a) + s_hi**2 / len(b))
        rows.append({"axis": axis, "what": what, "gain": gain, "gain_se": se,
                     "p": welch_p(a, b), "seeds": (len(a), len(b)),
                     "added_params": hi_params - lo_params,
                     "per_doubling": gain / math.log2(hi_params / lo_params),
                     "per_million": gain / ((hi_params - lo_params) / 1e6)})

    sizes = [m for m in g.models if any(k[0] == m for k in res.groups)]
    if len(sizes) > 1:
        for method in res.methods:
            rank = ref if ranked(method) else None
            keys = [(m, method, rank, frac) for m in sizes if res.values((m, method, rank, frac))]
            if len(keys) > 1:
                keys.sort(key=lambda k: res.first(k, "non_embedding_params"))
                add("base-model size", f"{_label(method, rank)}: {keys[0][0]} -> {keys[-1][0]}",
                    keys[0], keys[-1], res.first(keys[0], "non_embedding_params"),
                    res.first(keys[-1], "non_embedding_params"))
    for model in g.models:
        for method in [m for m in res.methods if ranked(m)]:
            keys = [(model, method, r, frac) for r in sorted(g.ranks_of(base_method(method)))
                    if res.values((model, method, r, frac))]
            if len(keys) > 1:
                add("rank", f"{model} {method}: r={keys[0][2]} -> r={keys[-1][2]}", keys[0],
                    keys[-1], res.first(keys[0], "trainable_params"),
                    res.first(keys[-1], "trainable_params"))
        for start in ("head", "bitfit"):  # a linear probe, and BitFit, against full tuning
            lo, hi = (model, start, None, frac), (model, "full", None, frac)
            if res.values(lo) and res.values(hi):
                add("method", f"{model}: {start} -> full", lo, hi,
                    res.first(lo, "trainable_params"), res.first(hi, "trainable_params"))
    return rows


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t test of equal means; None with fewer than 3 seeds on either side (a
    variance from 2 values is too unstable to test with)."""
    from scipy.stats import ttest_ind

    if len(a) < 3 or len(b) < 3:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return 0.0 if np.mean(a) != np.mean(b) else 1.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


# ----------------------------------------------------------------------------------------------
# Compute.


def training_flops(record: dict[str, Any]) -> float:
    """Training FLOPs of a cell: per processed (padded) token, forward 2N plus the backward pass
    through the activations 2N with a frozen base, plus the weight gradients 2N for full
    fine-tuning (N = non-embedding parameters; adapter and head FLOPs, a few percent, left
    out)."""
    per_token = (6.0 if record["axes"]["method"] == "full" else 4.0) * \
        record["non_embedding_params"]
    return per_token * float(record.get("padded_tokens") or record["tokens_seen"])


def compute_rows(res: Results) -> list[dict[str, Any]]:
    """Dev metric against training FLOPs (and inference FLOPs per token) per configuration,
    cheapest first; `frontier` marks the cells no cheaper cell beats."""
    rows = []
    for key, recs in res.groups.items():
        mean, std = _mean_std([r["value"] for r in recs])
        rows.append({"model": key[0], "method": key[1], "rank": key[2], "fraction": key[3],
                     "train_flops": float(np.mean([training_flops(r) for r in recs])),
                     "inference_flops_per_token": 2.0 * recs[0]["non_embedding_params"],
                     "mean": mean, "std": std, "seeds": len(recs)})
    rows.sort(key=lambda r: r["train_flops"])
    sign = 1 if res.higher_is_better else -1
    best = -math.inf
    for r in rows:
        r["frontier"] = sign * r["mean"] > best
        best = max(best, sign * r["mean"])
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
                     "train_flops": float(np.mean([training_flops(r) for r in recs])),
                     "wall_time_s": float(np.mean([r["wall_time_s"] for r in recs]))})
    return rows


def t_interval(values: list[float]) -> tuple[float, float]:
    """95% t interval of the mean over seeds ((nan, nan) with fewer than 2)."""
    from scipy.stats import t

    if len(values) < 2:
        return float("nan"), float("nan")
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = float(t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that are known (None where none is)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _mean_of(records: list[dict[str, Any]], field_name: str) -> float | None:
    return _mean([r.get(field_name) for r in records])


def train_time(record: dict[str, Any]) -> float | None:
    """The record's training seconds, or None where they are known to be wrong: a run resumed
    (a halving rung) by code before the record's `times_cover` mark counted only its last part,
    less every part's evaluations (negative in some committed records)."""
    if record.get("resumed_from") and record.get("times_cover") != "whole run":
        return None
    return record.get("train_time_s")


def method_rows(res: Results, reference: tuple[str, int] = ("lora", 8)) -> list[dict[str, Any]]:
    """Per model and method (and rank), at the largest data fraction: the dev metric's mean and
    95% t interval over seeds, trainable parameters, the training loop's memory above the
    frozen model, training time, adapter file size, and a Welch test against the reference
    (LoRA r=8 of the same model). `beats_reference`: higher (lower for perplexity) beyond seed
    noise (p < 0.05) with at most the reference's trainable parameters."""
    frac = max(res.grid.fractions)
    sign = 1.0 if res.higher_is_better else -1.0
    rows = []
    for model in res.grid.models:
        ref = res.groups.get((model, reference[0], reference[1], frac), [])
        ref_values = [r["value"] for r in ref]
        for (m, method, rank, f), recs in sorted(res.groups.items(),
                                                 key=lambda kv: (kv[0][1], kv[0][2] or 0)):
            if m != model or f != frac:
                continue
            values = [r["value"] for r in recs]
            p = welch_p(values, ref_values) if ref and recs is not ref else None
            trainable = recs[0]["trainable_params"]
            beats = (p is not None and p < 0.05 and bool(ref)
                     and sign * (np.mean(values) - np.mean(ref_values)) > 0
                     and trainable <= ref[0]["trainable_params"])
            rows.append({
                "model": model, "method": method, "rank": rank, "seeds": len(recs),
                "mean": float(np.mean(values)), "interval": t_interval(values),
                "trainable_params": trainable,
                "memory_increase_mb": _mean_of(recs, "train_memory_increase_mb"),
                "train_time_s": _mean([train_time(r) for r in recs]),
                "adapter_bytes": _mean_of(recs, "adapter_bytes"),
                "lr": sorted({r.get("selected_lr") or r["config"]["train"]["lr"] for r in recs}),
                "p_vs_reference": p, "beats_reference": beats})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def method_lines(res: Results, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Methods compared", "",
             f"Dev {res.metric}: mean and 95% t interval over seeds; memory: the training "
             "loop's peak above the frozen model it started with (CPU: resident set sampled "
             "every 20 ms); time: training steps only ('-' where not recorded correctly: "
             "halving rungs resumed by code before 2026-12-06 counted their last part only); "
             "Welch test against LoRA r=8 of the same "
             "model. 'beats' = better beyond seed noise (p < 0.05) at no more trainable "
             "parameters.", "",
             f"| model | method | rank | seeds | {res.metric} [95%] | trainable | memory MB | "
             "train s | adapter KB | lr | vs LoRA r=8 | beats |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["interval"]
        # One seed has no interval; say so instead of printing [nan, nan].
        interval = f"[{lo:.4f}, {hi:.4f}]" if not math.isnan(lo) else "[one seed: none]"
        lines.append(
            f"| {r['model']} | {r['method']} | {_rank_label(r['rank'])} | {r['seeds']} | "
            f"{r['mean']:.4f} {interval} | {r['trainable_params']:,} | "
            f"{_fmt(r['memory_increase_mb'], '.0f')} | {_fmt(r['train_time_s'], '.1f')} | "
            f"{_fmt(None if r['adapter_bytes'] is None else r['adapter_bytes'] / 1024, '.0f')} | "
            f"{', '.join(f'{v:g}' for v in r['lr'])} | "
            f"{format_p(r['p_vs_reference']) if r['p_vs_reference'] is not None else '-'} | "
            f"{'yes' if r['beats_reference'] else ''} |")
    return lines + [""]


def peft_comparison_record(res: Results, record: dict[str, Any]) -> dict[str, Any]:
    """One record in the layout of peft's method_comparison results (run_info, train_info,
    meta_info), so that it could be contributed upstream. The "valid" metric is the selection
    split's (what chose the checkpoint and the lr), the "test" metric is dev (what this report
    reports; the sets' own test splits are held back)."""
    cfg, axes, metric = record["config"], record["axes"], record["metric"]
    # A record keeps the config of the adaptune that wrote it: a field added since is absent
    # (None here), except compile, which an adaptune without the option never did.
    train, model = cfg.get("train", {}), cfg.get("model", {})
    evals = []
    for e in record.get("evaluations") or []:
        valid = (e.get("selection") or {}).get(metric, e.get(metric))
        evals.append({"step": e["step"], f"valid {metric}": valid,
                      "train loss": e.get("train_loss")})
    evals.append({"step": record["optimizer_steps"], f"test {metric}": record["value"],
                  "train loss": None, "train total tokens": record.get("tokens_seen")})
    name = f"{axes['method']}/{Path(axes['model']).name}" + (
        f"-rank{axes['rank']}" if axes.get("rank") else "") + (
        f"-data{axes['fraction']:g}" if axes["fraction"] < 1 else "") + f"-seed{axes['seed']}"
    return {
        "run_info": {
            "created_at": record.get("finished_at"), "total_time": record.get("wall_time_s"),
            "experiment_name": name, "peft_branch": None,
            "train_config": {
                "model_id": model.get("name", axes["model"]), "dtype": record.get("precision"),
                "max_seq_length": model.get("max_length"),
                "batch_size": train.get("batch_size"),
                "batch_size_eval": train.get("eval_batch_size"),
                "max_steps": record.get("planned_steps") or record["optimizer_steps"],
                "eval_steps": train.get("eval_every"),
                "compile": train.get("compile", False) in (True, "on"),
                "seed": train.get("seed", axes.get("seed")),
                "grad_norm_clip": train.get("max_grad_norm"),
                "optimizer_type": "AdamW",
                "optimizer_kwargs": {"lr": record.get("selected_lr") or train.get("lr"),
                                     "weight_decay": train.get("weight_decay")},
                "lr_scheduler": "linear (warm-up, then decay)",
                "lr_selected_on": f"{record.get('selection_examples') or 0} examples carved "
                                  "from train" if record.get("selected_on") == "selection"
                                  else "none (fixed lr)",
                "early_stopping_patience": train.get("early_stopping_patience", 0)},
            "peft_config": {"adaptune_method": cfg.get("method")},
            "error_msg": ""},
        "train_info": {
            "accelerator_memory_max": (record.get("train_peak_memory_mb") or 0) * 2**20,
            "train_time": train_time(record), "file_size": record.get("adapter_bytes"),
            "num_trainable_params": record["trainable_params"],
            "num_total_params": record["total_params"], "status": "success",
            "metrics": evals},
        "meta_info": {
            "model_info": {"name": axes["model"]},
            "dataset_info": {res.grid.dataset or "own data": {"task": res.grid.task}},
            "package_info": {f"{k}-version": v for k, v in (record.get("libraries") or {})
                             .items()},
            "system_info": {"accelerator": record.get("device")},
            "adaptune_commit": (record.get("code_version") or {}).get("commit")}}


def write_peft_comparison(res: Results, out: Path) -> Path:
    """peft_method_comparison/<method>--<model>-...json, one per finished cell."""
    folder = Path(out) / "peft_method_comparison"
    folder.mkdir(parents=True, exist_ok=True)
    for record in res.records:
        data = peft_comparison_record(res, record)
        write_json(folder / (data["run_info"]["experiment_name"].replace("/", "--") + ".json"),
                   data)
    return folder


def write_report(results: str | Path, out: str | Path | None = None, n_boot: int = 1000) -> str:
    """Write report.md, report.html (self-contained), results.csv, fits.json and plots/*.png;
    returns the Markdown report's path."""
    res = load_results(results)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(res)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"report: {len(res.records)} cells; fitting laws ({n_boot} bootstrap replicates)",
          flush=True)
    fits = fit_all(res, n_boot) if res.records else {}
    if res.records and len(res.methods) >= 3:
        write_peft_comparison(res, out)
    write_json(out / "fits.json", fits_to_json(fits) if fits else {})
    plots = make_plots(res, fits, out / "plots") if res.records else []
    from adaptune.advisor import load_backtests, pooled_advice_lines

    backtests = load_backtests(Path(results))
    text = render_markdown(res, rows, fits, axis_gains(res) if res.records else [],
                           compute_rows(res) if res.records else [], plots, out, backtests,
                           pooled_advice_lines(results, backtests))
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(markdown_to_html(text, out, title=res.grid.name))
    return str(out / "report.md")


def _law_rows(fits: dict[str, dict[str, Fit]]) -> list[str]:
    names = {"size": "size N", "rank": "rank r", "trainable": "trainable params",
             "data": "data D", "joint": "N x D (multiplicative)", "additive": "N x D (additive)"}
    lines = ["| law | series | verdict | exponents [95%] | exponent if E moves | lack of fit | "
             "vs flat | held out: observed / predicted [95% band] |",
             "|---|---|---|---|---|---|---|---|"]
    for axis, by_name in fits.items():
        for name, f in by_name.items():
            exps = ", ".join(f"{k} {f.params[k]:.3g} [{f.intervals[k][0]:.3g}, "
                             f"{f.intervals[k][1]:.3g}]" for k in ("alpha", "beta")
                             if k in f.params and k in f.intervals) or "-"
            sens = f.e_sensitivity.get("alpha")
            sens_text = f"{sens[0]:.3g} to {sens[1]:.3g}" if sens else "-"
            held = "; ".join(f"{h.observed:.4f} / {h.predicted:.4f} [{h.band[0]:.4f}, "
                             f"{h.band[1]:.4f}] {'in' if h.covered else 'OUT'}"
                             for h in f.held_out) or "-"
            verdict = "supported" if f.supported else f.verdict.split(":")[0]
            lines.append(f"| {names[axis]} | {name} | {verdict} | {exps} | {sens_text} | "
                         f"{format_p(f.p_lack_of_fit)} | {format_p(f.p_flat)} | {held} |")
    return lines


def render_markdown(res: Results, rows: list[dict[str, Any]], fits: dict[str, dict[str, Fit]],
                    gains: list[dict[str, Any]], compute: list[dict[str, Any]],
                    plots: list[Path], out: Path,
                    backtests: list[dict[str, Any]] | None = None,
                    pooled: list[str] | None = None) -> str:
    g = res.grid
    devices = sorted({r.get("device", "?") for r in res.records})
    commits = sorted({(r.get("code_version") or {}).get("commit") or "?" for r in res.records})
    seeds = sorted({len(v) for v in res.groups.values()})
    lines = [f"# {g.name}: {g.task} on {g.dataset or 'own data'}", "",
             "Produced by `adaptune report` from the cells in this folder; do not edit by hand.",
             "",
             f"- cells: {len(res.records)} done, {len(res.skipped)} not applicable, "
             f"{len(res.failed)} failed, {len(res.missing)} not run"
             + (f", {len(res.stale)} stale (from an edited grid, ignored)" if res.stale else ""),
             f"- device(s): {', '.join(devices) or '-'}; "
             f"code: {', '.join(c[:10] for c in commits)}",
             f"- metric: dev {res.metric} (mean ± sample std over {'/'.join(map(str, seeds))} "
             f"seeds); fits are on error = {'1 - ' if res.higher_is_better else ''}{res.metric}",
             f"- fixed settings: `{json.dumps(dict(g.overrides), sort_keys=True)}`"
             + (f"; per method: `{json.dumps(dict(g.method_overrides), sort_keys=True)}`"
                if g.method_overrides else ""), ""]
    for name, by_value in sorted(res.drift.items()):
        now = json.dumps(_current_value(res, name))
        parts = [f"{len(ids)} cell(s) with {value}" for value, ids in sorted(by_value.items())]
        lines.append(f"- default changed since some cells ran: `{name}` is {now} now; "
                     + ", ".join(parts) + " (their results are kept and shown as they ran)")
    for s in res.skipped:
        lines.append(f"- not applicable: {s['id']}: {s['reason']}")
    for name in res.failed:
        lines.append(f"- failed: {name} (failed/{name}.json)")
    if res.missing:
        lines.append(f"- not run: {', '.join(res.missing[:12])}"
                     + (f" and {len(res.missing) - 12} more" if len(res.missing) > 12 else ""))
    lines += ["", "## Results", "",
              "| model | non-emb params | method | rank | data | seeds | "
              f"{res.metric} | trainable | train PFLOP | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['non_embedding_params'] / 1e6:.1f}M | {r['method']} | "
                     f"{_rank_label(r['rank'])} | {r['train_examples']:,} | {r['seeds']} | "
                     f"{r['mean']:.4f} ± {r['std']:.4f} | {r['trainable_params']:,} | "
                     f"{r['train_flops'] / 1e15:.3g} | {r['wall_time_s']:.0f} |")
    if res.searches:
        lines += lr_search_lines(res)
    if len(res.methods) >= 3 and res.records:
        lines += method_lines(res, method_rows(res))
    if fits:
        covered, checked = held_out_coverage(fits)
        supported = [f"{axis} {name}" for axis, by_name in fits.items()
                     for name, f in by_name.items() if f.supported]
        lines += ["", "## Scaling laws and their held-out checks", "",
                  "Noise model of each point (adaptune.scaling): seed variance pooled over the "
                  "series (redrawn from its chi-square in each replicate), dev-set sampling "
                  "noise (binomial, common to all points of a series: same dev examples), and "
                  "the law's misfit (the lack-of-fit F test against pure seed error; where the "
                  "law misfits, the noise is inflated by the misfit ratio). Intervals are 95% "
                  "percentiles of a parametric bootstrap. A law is supported only with at least "
                  "4 x values of one lineage, a passing lack-of-fit test, exponent intervals "
                  "clear of zero, a significant gain over a flat line, and a passing held-out "
                  "check (fitted without the largest x, predicting it within its 95% band). "
                  "'exponent if E moves': alpha refitted with the floor E pinned at 0 and at "
                  "its interval's ends.", "",
                  f"- supported: {', '.join(supported) or 'none'}",
                  f"- held-out cells inside their 95% band: {covered} of {checked}"
                  + (f" ({covered / checked:.0%})" if checked else ""), ""]
        lines += _law_rows(fits)
        lines.append("")
        for axis, by_name in fits.items():
            for name, fit in by_name.items():
                if fit.supported:
                    lines.append(f"- {axis} {name}: {fit.describe()}")
        lines += _joint_comparison(fits)
    if gains:
        lines += ["", "## Which axis buys the most", "",
                  "Metric gained from the smallest to the largest setting of each axis (± standard"
                  " error over seeds; Welch t test, none with fewer than 3 seeds a side), per "
                  "doubling of the parameters that axis adds and per million added parameters "
                  "(size adds frozen base parameters, rank and method trainable ones).", "",
                  "| axis | from -> to | gain | Welch | added params | per doubling | "
                  "per million |", "|---|---|---|---|---|---|---|"]
        for r in sorted(gains, key=lambda r: -r["per_doubling"]):
            p_text = format_p(r["p"]) if r["p"] is not None else \
                f"n/a ({min(r['seeds'])} seeds)"
            lines.append(f"| {r['axis']} | {r['what']} | {r['gain']:+.4f} ± {r['gain_se']:.4f} "
                         f"| {p_text} | {r['added_params']:,.0f} | {r['per_doubling']:+.4f} | "
                         f"{r['per_million']:+.4f} |")
        lines += ["", verdict_on_axes(gains), ""]
    if compute:
        lines += ["## Metric at equal compute", "",
                  "Training FLOPs per cell (4N per processed token with a frozen base, 6N for "
                  "full fine-tuning; N = non-embedding parameters) and inference FLOPs per "
                  "token (2N). Cheapest first; 'frontier' marks cells that no cheaper cell "
                  "beats: read 'a bigger base or more data at equal compute' down this table.",
                  "", f"| model | method | rank | data fraction | train PFLOP | inference "
                  f"GFLOP/token | {res.metric} | frontier |", "|---|---|---|---|---|---|---|---|"]
        for r in compute:
            lines.append(f"| {r['model']} | {r['method']} | {_rank_label(r['rank'])} | "
                         f"{r['fraction']:g} | {r['train_flops'] / 1e15:.3g} | "
                         f"{r['inference_flops_per_token'] / 1e9:.3g} | {r['mean']:.4f} ± "
                         f"{r['std']:.4f} | {'yes' if r['frontier'] else ''} |")
        lines.append("")
    if backtests:
        from adaptune.advisor import backtest_lines

        lines += backtest_lines(backtests) + list(pooled or [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})"
                                      for p in plots] + [""]
    return "\n".join(lines)


def lr_search_lines(res: Results) -> list[str]:
    """How each cell's learning rate was chosen, and what the search cost."""
    g = res.grid
    data = g.overrides.get("data", {})
    patience = g.overrides.get("train", {}).get("early_stopping_patience", 0)
    spent = sum(s["steps"] for s in res.searches)
    without = sum(s["steps_without_halving"] for s in res.searches)
    fractions = ", ".join(f"{g.rung_fraction(k):.3g}" for k in range(g.rungs))
    lines = ["", "## Learning-rate selection", "",
             f"Each cell's lr is chosen per seed on a selection split of "
             f"{data.get('selection_examples')} training examples (drawn by seed "
             f"{data.get('selection_seed', 0)}, never trained on); dev is scored only for the "
             "kept checkpoint, for this report. "
             + (f"Successive halving: {g.rungs} rungs, the best 1/{g.eta} of the lrs continue "
                f"from each rung (the rungs train {fractions} of the schedule). "
                if g.rungs > 1 else "Every lr trained to the end. ")
             + (f"Early stopping on the selection split, patience {patience} evaluations. "
                if patience else "")
             + f"Optimizer steps spent on the searches: {spent:,}; every lr run to its whole "
             f"schedule would cost {without:,}"
             + (f" ({without / spent:.1f}x more)" if spent else "") + ".", "",
             "'Closest cut' is, per seed, the narrowest decision of its search: the "
             "selection-score gap between the worst lr a rung kept and the best lr it cut, and "
             "the step it was decided at (exact ties, settled by the tie-break, left out). A "
             "gap of a point or two at an early step is a search "
             "that another seed may decide the other way, so the cell's spread over seeds "
             "may understate its spread over searches.", "",
             "| model | method | rank | data | lrs chosen (per seed) | closest cut (per seed) "
             "| steps per search |",
             "|---|---|---|---|---|---|---|"]
    by_cell: dict[tuple, list[dict[str, Any]]] = {}
    for search in res.searches:
        key = (search["model"], search["method"], search["rank"], search["fraction"])
        by_cell.setdefault(key, []).append(search)
    for (model, method, rank, fraction), searches in sorted(
            by_cell.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3])):
        chosen = ", ".join(f"{s['selected_lr']:g}" for s in sorted(searches,
                                                                   key=lambda s: s["seed"]))
        cuts = ", ".join("-" if s.get("closest_cut") is None else
                         f"{s['closest_cut'][0]:.3f} at {s['closest_cut'][1]}"
                         for s in sorted(searches, key=lambda s: s["seed"]))
        steps = np.mean([s["steps"] for s in searches])
        lines.append(f"| {model} | {method} | {_rank_label(rank)} | {fraction:g} | {chosen} | "
                     f"{cuts} | {steps:.0f} |")
    return lines + [""]


def _current_value(res: Results, name: str) -> Any:
    """A config field's value as this version resolves the grid's cells."""
    from adaptune.config import to_dict
    from adaptune.sweep import config_value

    return config_value(to_dict(next(iter(res.cells.values())).config), name)


def _joint_comparison(fits: dict[str, dict[str, Fit]]) -> list[str]:
    """Which joint form predicts the held-out data size better, per series."""
    lines = []
    for name in sorted(set(fits.get("joint", {})) & set(fits.get("additive", {}))):
        errors = {form: [abs(h.error) for h in fits[form][name].held_out]
                  for form in ("joint", "additive")}
        if all(errors.values()):
            mae = {form: float(np.mean(v)) for form, v in errors.items()}
            better = min(mae, key=mae.get)
            lines.append(f"- joint forms, {name}: held-out mean absolute error "
                         f"{mae['joint']:.4f} (multiplicative) vs {mae['additive']:.4f} "
                         f"(additive): the {'multiplicative' if better == 'joint' else 'additive'}"
                         " form predicts the largest data size better")
    return lines


def verdict_on_axes(gains: list[dict[str, Any]]) -> str:
    """One sentence: the axis with the largest significant gain per doubling, and per parameter.
    Significant: Welch p < 0.05 where there are 3 seeds a side, else a gain over twice its
    standard error (stated as such)."""
    def significant(r: dict[str, Any]) -> bool:
        return r["p"] < 0.05 and r["gain"] > 0 if r["p"] is not None else \
            r["gain"] > 2 * r["gain_se"]

    sig = [r for r in gains if significant(r)]
    few = any(r["p"] is None for r in gains)
    if not sig:
        return "No axis gives a significant gain at this budget."
    by_doubling = max(sig, key=lambda r: r["per_doubling"])
    by_param = max(sig, key=lambda r: r["per_million"])
    flat = sorted({r["axis"] for r in gains} - {r["axis"] for r in sig})
    text = (f"Per doubling of parameters, {by_doubling['axis']} pays most "
            f"({by_doubling['what']}: {by_doubling['per_doubling']:+.4f}); per added parameter, "
            f"{by_param['axis']} ({by_param['what']}: {by_param['per_million']:+.4f} per million).")
    if flat:
        text += f" No significant gain along: {', '.join(flat)}."
    if few:
        text += (" Rows with fewer than 3 seeds a side count as significant only by a gain "
                 "over twice its standard error, which 2 seeds estimate poorly.")
    return text


# ----------------------------------------------------------------------------------------------
# Plots.


def make_plots(res: Results, fits: dict[str, dict[str, Fit]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    g = res.grid
    frac = max(g.fractions)
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=90)
        plt.close(fig)
        made.append(folder / f"{name}.png")

    def readable(value: float, _pos: Any = None) -> str:
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= div:
                return f"{value / div:g}{unit}"
        return f"{value:g}"

    # 1. error against each fitted variable, log-log: seeds as points, the law and its band.
    xlabel = {"size": "non-embedding parameters", "rank": "rank", "trainable":
              "trainable parameters", "data": "training examples"}
    for axis in ("size", "rank", "data"):
        series = [(name, f) for name, f in fits.get(axis, {}).items() if f.n_points >= 2]
        if not series:
            continue
        cols = min(3, len(series))
        rows_n = math.ceil(len(series) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n),
                                 squeeze=False)
        for ax, (name, fit) in zip(axes.ravel(), series):
            xs, ys = _series_points(res, axis, name)
            ax.scatter(xs, ys, s=14, alpha=0.6, label="seeds")
            groups: dict[float, list[float]] = {}
            for x, y in zip(xs, ys):
                groups.setdefault(x, []).append(y)
            keys = sorted(groups)
            means = [np.mean(groups[k]) for k in keys]
            sds = [np.std(groups[k], ddof=1) if len(groups[k]) > 1 else 0 for k in keys]
            ax.errorbar(keys, means, yerr=sds, fmt="o", color="k", capsize=3,
                        label="mean ± seed sd")
            if fit.params and fit.samples:
                grid_x = np.geomspace(min(keys), max(keys), 60)
                lo, hi = np.percentile(_band(fit, grid_x), [2.5, 97.5], axis=0)
                ax.plot(grid_x, fit.predict(grid_x), color="C1",
                        label="law" + ("" if fit.supported else " (not supported)"))
                ax.fill_between(grid_x, lo, hi, color="C1", alpha=0.2, label="95% band")
            ax.set(xscale="log", yscale="log", xlabel=xlabel[axis], ylabel=f"error (1 - "
                   f"{res.metric})" if res.higher_is_better else res.metric, title=name)
            ax.xaxis.set_major_formatter(FuncFormatter(readable))
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
            ax.legend(fontsize=7)
        for ax in axes.ravel()[len(series):]:
            ax.set_visible(False)
        save(fig, f"error_vs_{axis}")

    # 2. metric against trainable parameters, per method (one panel per model).
    budgets = {(k[1], k[2]) for k in res.groups}
    if len(budgets) > 1:
        fig, axes = plt.subplots(1, len(g.models), figsize=(5 * len(g.models), 4),
                                 squeeze=False)
        for ax, model in zip(axes[0], g.models):
            for method in res.methods:
                ranks = g.ranks_of(base_method(method)) if ranked(method) else [None]
                pts = [(res.first(k, "trainable_params"), *_mean_std(res.values(k)))
                       for r in ranks if res.values(k := (model, method, r, frac))]
                if pts:
                    x, mean, std = zip(*sorted(pts))
                    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3,
                                label=f"{method} (± seed sd)")
            ax.set(xscale="log", xlabel="trainable parameters", ylabel=res.metric, title=model)
            ax.xaxis.set_major_formatter(FuncFormatter(readable))
            ax.legend(fontsize=8)
        save(fig, "metric_vs_trainable_params")

    # 3. size x rank heat map (LoRA, else the first ranked method).
    ranked_methods = [m for m in res.methods if ranked(m)]
    if ranked_methods and len(g.ranks) > 1:
        method = "lora" if "lora" in ranked_methods else ranked_methods[0]
        ranks = sorted(g.ranks)
        grid = np.full((len(g.models), len(ranks)), np.nan)
        for i, model in enumerate(g.models):
            for j, r in enumerate(ranks):
                if vals := res.values((model, method, r, frac)):
                    grid[i, j] = float(np.mean(vals))
        fig, ax = plt.subplots(figsize=(1.2 * len(ranks) + 2, 0.8 * len(g.models) + 1.5))
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_yticks(range(len(g.models)), list(g.models))
        ax.set(xlabel=f"{method} rank", title=f"mean {res.metric}: base model x rank")
        fig.colorbar(image)
        save(fig, "size_x_rank_heatmap")
    return made


def _series_points(res: Results, axis: str, name: str) -> tuple[list[float], list[float]]:
    """The per-seed (x, error) points behind one fitted series."""
    g = res.grid
    frac = max(g.fractions)
    out_x, out_y = [], []
    if axis == "size":
        method, rank = _parse_label(name)
        keys = [(m, method, rank, frac) for m in g.models]
        field_name = "non_embedding_params"
    elif axis == "rank":
        model, method = name.rsplit(" ", 1)
        keys = [(model, method, r, frac) for r in g.ranks_of(base_method(method))]
        field_name = None
    else:
        model, label = name.split(" ", 1)
        method, rank = _parse_label(label)
        keys = [(model, method, rank, f) for f in g.fractions]
        field_name = "train_examples"
    for key in keys:
        for r in res.groups.get(key, []):
            out_x.append(float(key[2] if field_name is None else r[field_name]))
            out_y.append(res.error(r["value"]))
    return out_x, out_y


def _parse_label(label: str) -> tuple[str, int | None]:
    method, _, rank = label.partition(" r=")
    return method, (int(rank) if rank else None)


def _band(fit: Fit, x: np.ndarray) -> np.ndarray:
    """The law at x for every bootstrap replicate of its parameters."""
    from adaptune.scaling import _predict

    n = len(next(iter(fit.samples.values())))
    return np.array([_predict(fit.form, {k: v[i] for k, v in fit.samples.items()}, fit.x0, x)
                     for i in range(n)])


# ----------------------------------------------------------------------------------------------
# A self-contained HTML version of the report.


def markdown_to_html(text: str, folder: Path, title: str) -> str:
    """The report's Markdown (headings, paragraphs, lists, tables, images, `code`) as one HTML
    file with the plots embedded, so it opens anywhere without the plots folder. A small script
    sets the page's data-images-loaded attribute once every image has decoded (what the
    browser test checks)."""
    import base64
    import html
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", s)

    body: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, data = rows[0], [r for r in rows[2:]]
            body.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head)
                        + "</tr></thead><tbody>" + "".join(
                            "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>"
                            for r in data) + "</tbody></table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif match := re.match(r"!\[([^\]]*)\]\(([^)]+)\)", line):
            png = (folder / match.group(2)).read_bytes()
            data = base64.b64encode(png).decode()
            body.append(f'<figure><img alt="{html.escape(match.group(1))}" '
                        f'src="data:image/png;base64,{data}"><figcaption>'
                        f"{inline(match.group(1))}</figcaption></figure>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             "th{background:#f0f0f0}img{max-width:100%}code{background:#f4f4f4}")
    script = ("window.addEventListener('load',function(){var i=document.images,ok=0;"
              "for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0)ok++;}"
              "document.body.setAttribute('data-images-loaded',ok+'/'+i.length);});")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style><script>{script}</script></head><body>"
            + "\n".join(body) + "</body></html>\n")


def fit_rank(res: Results, model: str, method: str, fraction: float,
             n_boot: int = 1000) -> Fit | None:
    """The rank law of one model and ranked method at one data fraction (None: no cells)."""
    keys = [(model, method, r, fraction) for r in res.grid.ranks_of(base_method(method))]
    x, y, v, dev = gather(res, keys, lambda r: r["axes"]["rank"])
    return fit_power_law(x, y, dev_var=v, dev=dev, n_boot=n_boot) if x else None
