"""The rank advisor: which method and rank reach within a tolerance of the best at the fewest
trainable parameters, how sure that is, and whether it holds on seeds the grid never used.

    advise(results, model, within)   -> Advice (its confidence from the scaling noise model)
    advise(..., confidence=0.8)      -> the cheapest cell that is within the tolerance in at
                                        least 80% of simulated replications, not on point means
    backtest(results, model, within) -> the pick and its rivals re-run on fresh seeds, with the
                                        advisor's own prediction of the outcome beside it
    tally([results, ...])            -> every backtest of those folders together: how often the
                                        promise was kept, with an exact interval, against how
                                        often the advisor predicted it would be
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
    target: float | None = None  # the confidence the pick was required to reach, if any

    def __str__(self) -> str:
        choice = _label(self.method, self.rank)
        sure = (f"Within tolerance in {self.confidence:.0%} of simulated replications "
                "(pooled seed noise)." if self.confidence is not None else
                "No confidence figure: fewer than 3 seeds per cell.")
        if self.target is not None:
            sure = f"Required confidence {self.target:.0%}. " + sure
        return (f"{self.model}: use {choice} ({self.trainable_params:,} trainable parameters): "
                f"mean {self.mean:.4f} over {self.seeds} seed(s), against the best, {self.best}, "
                f"at {self.best_mean:.4f}. {sure} {self.note}").strip()


def _choose(means: dict[Key, float], params: dict[Key, int], sign: float,
            within: float) -> tuple[Key, Key]:
    """(the cheapest cell within `within` of the best mean, the best)."""
    best = max(means, key=lambda k: sign * means[k])
    ok = [k for k in means if sign * (means[best] - means[k]) <= within + 1e-12]
    return min(ok, key=lambda k: (params[k], -sign * means[k])), best


def simulated_confidence(options: dict[Key, list[float]], sign: float, within: float,
                         among: Sequence[Key] | None = None, seeds: int | None = None,
                         n_boot: int = 2000, seed: int = 0) -> dict[Key, float] | None:
    """For every cell, the share of simulated replications in which its mean is within `within`
    of the best mean among `among` (default: all cells). A replication redraws every cell's
    mean around its observed mean with the seed variance pooled over the cells (itself redrawn
    from its chi-square); `seeds` asks what it would be with that many seeds per cell, if the
    means stayed where they are. None with fewer than 3 seeds in some cell."""
    keys = list(options)
    counts = np.array([len(options[k]) for k in keys], dtype=float)
    dof = int(sum(counts - 1))
    if min(counts) < 3 or dof <= 0:
        return None
    means = np.array([np.mean(options[k]) for k in keys])
    ss = sum(float(np.sum((np.array(options[k]) - np.mean(options[k])) ** 2)) for k in keys)
    rng = np.random.default_rng(seed)
    s2 = ss / rng.chisquare(dof, size=n_boot)
    n = counts if seeds is None else np.full(len(keys), float(seeds))
    sims = sign * (means[None, :] + rng.normal(size=(n_boot, len(keys)))
                   * np.sqrt(s2[:, None] / n[None, :]))
    ref = [keys.index(k) for k in (among if among is not None else keys)]
    best = sims[:, ref].max(axis=1)
    return {k: float(np.mean(best - sims[:, i] <= within + 1e-12)) for i, k in enumerate(keys)}


def _cheapest_sure(conf: dict[Key, float], params: dict[Key, int], target: float) -> Key | None:
    sure = [k for k in conf if conf[k] >= target]
    return min(sure, key=lambda k: (params[k], -conf[k])) if sure else None


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
           n_boot: int = 2000, seed: int = 0, confidence: float | None = None,
           fresh_seeds: bool = False) -> Advice:
    """The configuration with the fewest trainable parameters whose mean metric is within
    `within` of the best mean for this model (at this data fraction). Its confidence comes from
    the same noise model as the laws (`simulated_confidence`); the dev set is common to all
    cells and left out. No confidence figure from fewer than 3 seeds per cell.

    With `confidence` (say 0.8) the pick is instead the cheapest cell that is within the
    tolerance in at least that share of simulated replications: choosing on point means picks
    the cheapest cell that got lucky, which holds only as often as its own confidence says
    (about half the time at 3 seeds and a one-point tolerance). Where no cell reaches the
    target, the most confident cell is picked and the note says how many seeds would do.

    With `fresh_seeds` the backtest's fresh seeds (under <results>/backtest/) join the grid's
    for the cells that were re-run: the pick and its rivals are then ranked on 6 seeds, not 3.
    That advice is no longer tested by the backtest, which has become part of its data."""
    res = load_results(results)
    if fraction not in res.grid.fractions:
        fraction = max(res.grid.fractions)
    sign = 1.0 if res.higher_is_better else -1.0
    options = {k: res.values(k) for k in res.groups if k[0] == model and k[3] == fraction}
    if fresh_seeds and options:
        fresh = fresh_values(Path(results), res, list(options))
        options = {k: v + fresh.get(k, []) for k, v in options.items()}
    if not options:
        known = sorted({k[0] for k in res.groups})
        raise ConfigError(f"advise: no finished cells for model {model!r} in {results}; "
                          f"models with results: {', '.join(known) or 'none'}")
    if confidence is not None and not 0 < confidence < 1:
        raise ConfigError(f"advise: confidence must lie strictly between 0 and 1 (a share of "
                          f"replications, say 0.8); got {confidence}")
    params = {k: res.first(k, "trainable_params") for k in options}
    means = {k: float(np.mean(v)) for k, v in options.items()}
    conf = simulated_confidence(options, sign, within, n_boot=n_boot, seed=seed)
    chosen, best = _choose(means, params, sign, within)
    note = ""
    if confidence is not None:
        if conf is None:
            raise ConfigError(f"advise: a confidence target needs at least 3 seeds in every "
                              f"cell of {model!r} in {results}")
        chosen = _cheapest_sure(conf, params, confidence) or max(conf, key=conf.get)
        if conf[chosen] < confidence:
            note = (f"No cell reaches {confidence:.0%}: picked the most confident. "
                    + _seeds_needed(options, params, sign, within, confidence, n_boot, seed))
    keys = list(options)
    if ranked(chosen[1]) and len(res.grid.ranks_of(base_method(chosen[1]))) > 1:
        fit = fit_rank(res, model, chosen[1], fraction, n_boot=300)
        if fit is not None:
            note = f"{note} Rank law for {model} {chosen[1]}: {fit.describe()}.".strip()
    # The rivals a backtest re-runs: the best (the tolerance's reference), and the cheapest
    # cells just outside the tolerance (fresh seeds could bring them in). Where the pick is the
    # best itself, the runner-up stands in for the best: it is the cell most likely to lead on
    # fresh seeds, and without it a pick that nothing undercuts would be re-run alone, a
    # backtest that cannot fail.
    cheaper = sorted((k for k in keys if params[k] < params[chosen]),
                     key=lambda k: -sign * means[k])
    runner_up = sorted((k for k in distinct([chosen, *keys])[1:]),
                       key=lambda k: -sign * means[k])[:1] if chosen == best else []
    others = distinct([chosen, best, *runner_up, *cheaper])[1:]  # none trains as another
    rivals = tuple(others[:3 if others and others[0] == best else 2])
    return Advice(model, chosen[1], chosen[2], means[chosen], params[chosen],
                  _label(best[1], best[2]), means[best],
                  None if conf is None else conf[chosen], len(options[chosen]),
                  note, rivals, chosen, confidence)  # distinct() left the pick out of rivals


def _seeds_needed(options: dict[Key, list[float]], params: dict[Key, int], sign: float,
                  within: float, target: float, n_boot: int, seed: int) -> str:
    for n in range(4, 31):
        conf = simulated_confidence(options, sign, within, seeds=n, n_boot=n_boot, seed=seed)
        pick = _cheapest_sure(conf, params, target) if conf else None
        if pick is not None:
            return (f"With {n} seeds per cell, if the means stayed where they are, "
                    f"{_label(pick[1], pick[2])} would reach it.")
    return "Not even 30 seeds per cell would, at these means: widen the tolerance."


def backtest(results: str | Path, model: str, within: float = 0.01,
             seeds: Sequence[int] = (1000, 1001, 1002), fraction: float = 1.0,
             confidence: float | None = None) -> dict[str, Any]:
    """Re-run the advisor's pick and its rivals on seeds the grid never used, through the same
    runner (records under <results>/backtest/), and say whether the pick held: whether the
    advisor, given only the fresh seeds of those cells, picks the same one."""
    from adaptune.report import base_method
    from adaptune.sweep import finished, search_cells, work_through

    folder = Path(results)
    res = load_results(folder)
    used = set(res.grid.seeds)
    if used & set(seeds):
        raise ConfigError(f"backtest: seeds {sorted(used & set(seeds))} are the grid's own; "
                          "choose seeds it never used")
    advice = advise(folder, model, within, fraction, confidence=confidence)
    g = res.grid
    out = folder / "backtest"
    # Each pick and rival re-run as the grid ran it: with an lr search, the whole search (on
    # the selection split) per fresh seed, so the backtest replicates the protocol, not a lr
    # chosen with the grid's seeds.
    cells = [c for k in (advice.key, *advice.rivals) for s in seeds
             for c in search_cells(g, k[0], base_method(k[1]), k[2], k[3], s,
                                   _scaling_of(g, k[1]))]
    done = finished(out, cells)  # read once: the records of every cell in one pass
    _refuse_another_protocol(res, [c for c in cells if c.id not in done])
    out.mkdir(parents=True, exist_ok=True)
    work_through(g, out, label="backtest ", cells=cells)
    return summarize_backtest(folder, model, within, advice, seeds)


def _refuse_another_protocol(res: Any, pending: list[Any]) -> None:
    """Fresh cells run with this adaptune's defaults. Where the grid's cells ran with another
    value of a setting the grid does not fix (a default changed since they ran), fresh runs
    would test them under another protocol: refuse, naming the settings and the code the grid
    ran, rather than compare the two."""
    if not pending or not res.drift:
        return
    then = "; ".join(f"{name}: {', '.join(sorted(values))}"
                     for name, values in sorted(res.drift.items()))
    commits = sorted({str((r.get("code_version") or {}).get("commit") or "unknown")[:7]
                      for r in res.records})
    raise ConfigError(
        f"backtest: {len(pending)} fresh cell(s) would run with this adaptune's defaults, but "
        f"the grid's cells ran with other values of settings the grid does not fix ({then}); "
        f"run the backtest with the grid's code (commit {', '.join(commits)}: git worktree add "
        f"DIR COMMIT, then PYTHONPATH=DIR adaptune advise ... --backtest), or set those values "
        "in the grid file")


def _scaling_of(grid: Any, label: str) -> str | None:
    """The scaling a report method label stands for (None where the grid has no such axis)."""
    from adaptune.report import base_method

    if not grid.scalings or not grid.scalings_of(base_method(label))[0]:
        return None
    return label.split("+", 1)[1] if "+" in label else "alpha/r"


def backtest_records(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / "backtest" / "cells"
    return [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))] \
        if path.is_dir() else []


def fresh_values(folder: Path, res: Any, keys: Sequence[Key],
                 seeds: Sequence[int] | None = None) -> dict[Key, list[float]]:
    """The backtest's values of `keys` at `seeds` (default: every seed of its records that the
    grid never used): for a grid with an lr search, per fresh seed the lr that seed's own
    search selected on the selection split (dev is not looked at)."""
    from adaptune.report import select_lrs
    from adaptune.sweep import search_cells

    records = backtest_records(folder)
    g = res.grid
    if seeds is None:
        seeds = sorted({r["axes"]["seed"] for r in records} - set(g.seeds))
    if g.lrs or g.method_lrs:
        cells = {c.id: c for k in keys for s in seeds
                 for c in search_cells(g, k[0], base_method(k[1]), k[2], k[3], s,
                                       _scaling_of(g, k[1]))}
        records, _ = select_lrs(g, cells, [r for r in records
                                           if r.get("id") in cells and r.get("status") == "ok"],
                                res.higher_is_better)
    fresh: dict[Key, list[float]] = {}
    for r in records:
        a = r["axes"]
        k = (a["model"], a["method"], a["rank"], a["fraction"])
        if k in keys and a["seed"] in seeds and r.get("status") == "ok":
            fresh.setdefault(k, []).append(r["value"])
    return fresh


def summarize_backtest(folder: Path, model: str, within: float, advice: Advice,
                       seeds: Sequence[int]) -> dict[str, Any]:
    res = load_results(folder)
    sign = 1.0 if res.higher_is_better else -1.0
    keys = (advice.key, *advice.rivals)
    fresh = fresh_values(folder, res, keys, seeds)
    means = {k: float(np.mean(v)) for k, v in fresh.items()}
    params = {k: res.first(k, "trainable_params") for k in fresh}
    held = None
    if advice.key in means and len(means) == len(keys):
        if advice.target is None:
            held = _choose(means, params, sign, within)[0] == advice.key
        else:  # the same rule on the fresh seeds of the re-run cells
            conf = simulated_confidence(fresh, sign, within)
            held = None if conf is None else (
                _cheapest_sure(conf, params, advice.target) or max(conf, key=conf.get)
            ) == advice.key
    summary = {"model": model, "within": within, "pick": _label(advice.method, advice.rank),
               "rule": rule_name(advice.target), "confidence_target": advice.target,
               "pick_committed_mean": advice.mean, "pick_fresh_mean": means.get(advice.key),
               "rivals": [_label(k[1], k[2]) for k in advice.rivals],
               "fresh_means": {_label(k[1], k[2]): v for k, v in means.items()},
               "fresh_seeds": list(seeds), "held": held,
               "predicted_within_best": predicted_within_best(res, advice, sign, within),
               "higher_is_better": res.higher_is_better}
    summary["within_best"] = within_best(summary)
    name = model if advice.target is None else f"{model}-confidence{advice.target:g}"
    write_json(folder / "backtest" / f"summary-{name}.json", summary)
    return summary


def rule_name(target: float | None) -> str:
    return "cheapest within tolerance on means" if target is None else \
        f"cheapest within tolerance in >= {target:.0%} of replications"


def predicted_within_best(res: Any, advice: Advice, sign: float, within: float) -> float | None:
    """What the advisor's noise model predicts for the backtest: the share of replications of
    the committed cells in which the pick is within the tolerance of the best of the re-run
    cells (the pick and its rivals). A calibrated advisor keeps its promise about this often;
    the pick was chosen on the same seeds, so a shortfall measures the winner's curse."""
    options = {k: res.values(k) for k in res.groups
               if k[0] == advice.model and k[3] == advice.key[3]}
    conf = simulated_confidence(options, sign, within, among=[advice.key, *advice.rivals])
    return None if conf is None else conf[advice.key]


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
    """The backtest summaries of a results folder; one written by an older adaptune gets what
    it lacks now: its rule, `within_best` from its stored fresh means, and the advisor's
    prediction (the advice is deterministic, so the same pick)."""
    path = Path(folder) / "backtest"
    summaries = [json.loads(p.read_text()) for p in sorted(path.glob("summary-*.json"))] \
        if path.is_dir() else []
    for b in summaries:
        b.setdefault("rule", rule_name(None))
        b["within_best"] = within_best(b)
        if "predicted_within_best" not in b:
            res = load_results(folder)
            advice = advise(folder, b["model"], b["within"])
            if _label(advice.method, advice.rank) == b["pick"]:
                sign = 1.0 if res.higher_is_better else -1.0
                b["predicted_within_best"] = predicted_within_best(res, advice, sign,
                                                                   b["within"])
    return summaries


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def _rule_short(target: float | None) -> str:
    return "means" if target is None else f">= {target:.0%}"


def _count_by_rule(backtests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per rule, over the decided backtests: how many, in how many the promise was kept and
    the same cell picked, and the advisor's predictions of the promise (where it made one)."""
    counts = {}
    for rule in sorted({b["rule"] for b in backtests}):
        decided = [b for b in backtests if b["rule"] == rule and b["held"] is not None]
        counts[rule] = {"models": len(decided),
                        "kept": sum(bool(b["within_best"]) for b in decided),
                        "same_pick": sum(bool(b["held"]) for b in decided),
                        "predictions": [b["predicted_within_best"] for b in decided
                                        if b.get("predicted_within_best") is not None]}
    return counts


def backtest_lines(backtests: list[dict[str, Any]]) -> list[str]:
    """The report's backtest section, from `load_backtests`."""
    lines = ["## Advisor backtest on fresh seeds", "",
             "The advisor's pick and its rivals re-run on seeds the grid never used "
             "(`adaptune advise --backtest`). 'Within tolerance of the best' is the advisor's "
             "promise: the pick's fresh mean within the tolerance of the best re-run cell. "
             "'Same pick' is stricter: the advisor, given only the fresh seeds, picks the same "
             "cell (it fails when a cheaper rival moves inside the tolerance). 'Predicted' is "
             "the advisor's own noise model's chance of the promise, computed before the "
             "re-runs: a calibrated advisor keeps it about that often.", ""]
    for rule, c in _count_by_rule(backtests).items():
        predicted = c["predictions"]
        expected = (f"; the advisor predicted {sum(predicted):.1f} of {len(predicted)}"
                    if predicted else "")
        lines.append(f"- {rule}: the promise was kept in {c['kept']} of {c['models']} models"
                     f"{expected}; the same pick in {c['same_pick']} of {c['models']}.")
    lines += ["", "| model | rule | tolerance | pick | committed mean | fresh mean | rivals "
              "(fresh means) | predicted | within tolerance of the best | same pick |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b in backtests:
        rivals = ", ".join(f"{name} {b['fresh_means'].get(name, float('nan')):.4f}"
                           for name in b["rivals"])
        fresh, predicted = b["pick_fresh_mean"], b.get("predicted_within_best")
        lines.append(f"| {b['model']} | {_rule_short(b.get('confidence_target'))} | "
                     f"{b['within']:g} | {b['pick']} | {b['pick_committed_mean']:.4f} | "
                     f"{'-' if fresh is None else f'{fresh:.4f}'} | {rivals} | "
                     f"{'-' if predicted is None else f'{predicted:.0%}'} | "
                     f"{_yes_no(b['within_best'])} | {_yes_no(b['held'])} |")
    return lines + [""]


def _at_most(k: int, chances: Sequence[float]) -> float:
    """P(at most k successes) in independent trials with these chances (Poisson binomial)."""
    dist = np.array([1.0])
    for p in chances:
        dist = np.append(dist * (1 - p), 0.0) + np.append(0.0, dist * p)
    return float(dist[:k + 1].sum())


def tally(folders: Sequence[str | Path]) -> dict[str, Any]:
    """Every finished backtest of these results folders, per rule: in how many models the
    promise (within tolerance of the best re-run cell) was kept, with a 95% Clopper-Pearson
    interval; the same pick; and the calibration check: the number the advisor's own
    predictions expected, and the chance of keeping it this rarely if those predictions were
    right (a small value says the advisor is overconfident)."""
    from scipy.stats import binomtest

    rows = []
    for folder in folders:
        path = Path(folder)
        if not (path / "grid.json").is_file():
            raise ConfigError(f"{path}: not a results folder (no grid.json); give the folders "
                              "that `adaptune sweep --out` wrote")
        rows += [{**b, "results": path.name} for b in load_backtests(path)
                 if b["held"] is not None]
    if not rows:
        raise ConfigError(f"no finished backtest under {', '.join(map(str, folders))} "
                          "(run `adaptune advise RESULTS --model M --backtest` first)")
    rules = {}
    for rule, c in _count_by_rule(rows).items():
        interval = binomtest(c["kept"], c["models"]).proportion_ci(method="exact")
        predicted = c.pop("predictions")
        calibrated = len(predicted) == c["models"]  # else no calibration check
        rules[rule] = {
            **c, "kept_ci95": [interval.low, interval.high],
            "predicted": sum(predicted) if calibrated else None,
            "chance_of_so_few": _at_most(c["kept"], predicted) if calibrated else None}
    return {"rules": rules, "backtests": rows}


def tally_lines(folders: Sequence[str | Path]) -> list[str]:
    t = tally(folders)
    lines = [f"Advisor backtests in {', '.join(Path(f).name for f in folders)} "
             "(the promise: the pick's fresh mean within the tolerance of the best re-run cell)."]
    for rule, r in t["rules"].items():
        low, high = r["kept_ci95"]
        line = (f"- {rule}: kept in {r['kept']} of {r['models']} ({r['kept'] / r['models']:.0%}, "
                f"95% CI {low:.0%}-{high:.0%}); the same pick in {r['same_pick']}")
        if r["predicted"] is not None:
            line += (f"; the advisor predicted {r['predicted']:.1f}, and if its predictions "
                     f"were right, {r['kept']} or fewer would happen with chance "
                     f"{r['chance_of_so_few']:.2f}")
        lines.append(line + ".")
    lines += ["", "| results | model | rule | pick | predicted | kept | same pick |",
              "|---|---|---|---|---|---|---|"]
    for b in t["backtests"]:
        predicted = b.get("predicted_within_best")
        lines.append(f"| {b['results']} | {b['model']} | "
                     f"{_rule_short(b.get('confidence_target'))} | {b['pick']} | "
                     f"{'-' if predicted is None else f'{predicted:.0%}'} | "
                     f"{_yes_no(b['within_best'])} | {_yes_no(b['held'])} |")
    return lines


def pooled_advice_lines(folder: str | Path, backtests: list[dict[str, Any]]) -> list[str]:
    """Each backtested model's advice again with the fresh seeds joined to the grid's: the
    pick and its rivals ranked on 6 seeds instead of 3. Not a test of the advisor (the fresh
    seeds are now its data): the better-informed advice, for a user who wants one."""
    asked = sorted({(b["model"], b.get("confidence_target"), b["within"]) for b in backtests},
                   key=lambda t: (t[0], -1.0 if t[1] is None else t[1], t[2]))
    if not asked:
        return []
    lines = ["### The advice with the fresh seeds added", "",
             "The same rule on the grid's seeds and the backtest's together, so that the "
             "cells the advisor contends between (the pick and its rivals) have twice the "
             "seeds. Cells that were not re-run keep the grid's seeds. This advice is no longer "
             "checked by the backtest, whose seeds it uses.", "",
             "| model | rule | tolerance | pick on the grid's seeds | pick on all seeds | its "
             "seeds | its mean | best (mean) | confidence |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, target, within in asked:
        before = advise(folder, model, within, confidence=target)
        after = advise(folder, model, within, confidence=target, fresh_seeds=True)
        sure = "-" if after.confidence is None else f"{after.confidence:.0%}"
        lines.append(f"| {model} | {_rule_short(target)} | "
                     f"{within:g} | {_label(before.method, before.rank)} | "
                     f"{_label(after.method, after.rank)} | {after.seeds} | {after.mean:.4f} | "
                     f"{after.best} ({after.best_mean:.4f}) | {sure} |")
    return lines + [""]
