"""The statistics behind the scaling reports, on synthetic data with known truth: interval
coverage, the lack-of-fit test, the held-out check, the advisor's noise model and backtest, and
results folders written by an older adaptune."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from adaptune import advisor, report
from adaptune.scaling import fit_joint_law, fit_power_law, format_p

XS = np.array([1, 2, 4, 8, 16, 64])
E, A, ALPHA = 0.1, 0.2, 0.5


def _coverage(seeds: int, sims: int, noise: float = 0.01) -> dict[str, float]:
    rng = np.random.default_rng(seeds)
    hits = {"alpha": 0, "E": 0, "A": 0, "held_out": 0}
    for s in range(sims):
        x = np.repeat(XS, seeds)
        fit = fit_power_law(x, E + A * x**-ALPHA + rng.normal(0, noise, len(x)), n_boot=150,
                            seed=s)
        for name, truth in (("alpha", ALPHA), ("E", E), ("A", A)):
            lo, hi = fit.intervals[name]
            hits[name] += lo <= truth <= hi
        hits["held_out"] += all(h.covered for h in fit.held_out)
    return {k: v / sims for k, v in hits.items()}


@pytest.mark.parametrize("seeds", [2, 3])
def test_intervals_reach_their_nominal_coverage(seeds):
    """95% intervals of every parameter, and the held-out band, cover the truth in 85-100% of
    40 simulated grids (binomial sd at 95% over 40 draws: 3.4 points; over 100 grids at 3 seeds
    and 60 at 2 seeds they covered 94-98%). A bootstrap of each point's own 2 seeds, which this
    replaced, halves the variance of a 2-seed mean."""
    coverage = _coverage(seeds, sims=40)
    for name, value in coverage.items():
        assert 0.85 <= value <= 1.0, (name, coverage)


def test_lack_of_fit_rejects_a_wrong_law_and_accepts_a_right_one():
    rng = np.random.default_rng(11)
    x = np.repeat(XS, 3)
    right = wrong = 0
    for _ in range(25):
        truth = E + A * x**-ALPHA
        bump = 0.04 * np.isin(x, [4, 8])  # non-monotone: no power law passes through it
        right += (fit_power_law(x, truth + rng.normal(0, 0.006, len(x)), n_boot=20,
                                held_out=False).p_lack_of_fit or 1) < 0.05
        wrong_fit = fit_power_law(x, truth + bump + rng.normal(0, 0.006, len(x)), n_boot=20,
                                  held_out=False)
        wrong += (wrong_fit.p_lack_of_fit or 1) < 0.05
        if (wrong_fit.p_lack_of_fit or 1) < 0.05:
            assert not wrong_fit.supported and "misfits" in wrong_fit.verdict
    assert right <= 4 and wrong >= 20, (right, wrong)


def test_held_out_check_catches_a_law_that_does_not_extrapolate():
    rng = np.random.default_rng(2)
    x = np.repeat(XS, 3)
    y = E + A * x**-ALPHA + rng.normal(0, 0.004, len(x))
    good = fit_power_law(x, y, n_boot=200)
    assert good.supported and good.held_out[0].x == (64.0,) and good.held_out[0].covered
    # The largest rank falls off a cliff the smaller ones give no hint of.
    broken = fit_power_law(x, np.where(x == 64, y + 0.08, y), n_boot=200)
    assert not broken.held_out[0].covered and not broken.supported


def test_three_points_or_an_unidentified_exponent_are_not_a_law():
    rng = np.random.default_rng(4)
    three = fit_power_law(np.repeat([1, 4, 16], 3), np.repeat([0.4, 0.2, 0.1], 3)
                          + rng.normal(0, 0.002, 9), n_boot=100)
    assert three.form == "pure" and not three.supported and "at least 4" in three.verdict
    # A floor reached at the second point: any fast exponent fits, so none is identified.
    x = np.repeat(XS, 3)
    step = fit_power_law(x, np.where(x == 1, 0.3, 0.1) + rng.normal(0, 0.002, len(x)),
                         n_boot=100)
    assert not step.supported


def test_both_joint_forms_are_fitted_and_compared_on_held_out_data():
    rng = np.random.default_rng(3)
    n, d = np.meshgrid([5e6, 1e7, 2e7, 8e7], [500, 1000, 2000, 4000])
    n, d = np.repeat(n.ravel(), 3), np.repeat(d.ravel(), 3)
    y = 0.05 + 2.0 * (n / 5e6) ** -0.3 * (d / 500) ** -0.2 + rng.normal(0, 0.003, len(n))
    mult = fit_joint_law(n, d, y, form="joint", n_boot=100)
    add = fit_joint_law(n, d, y, form="additive", n_boot=100)
    assert mult.supported, mult.verdict
    assert set(add.params) == {"E", "A", "B", "alpha", "beta"}
    assert len(mult.held_out) == 4  # the largest data size at each of 4 model sizes
    mae = {f.form: np.mean([abs(h.error) for h in f.held_out]) for f in (mult, add)}
    assert mae["joint"] < mae["additive"]  # the data were made multiplicative


def test_p_values_at_sensible_precision():
    assert format_p(1.6e-68) == "p < 0.001" and format_p(0.026) == "p = 0.026"
    assert format_p(0.42) == "p = 0.42" and format_p(None) == "n/a"


# ----------------------------------------------------------------------------------------------
# Results folders.

OLD = Path(__file__).parent / "fixtures" / "old_results"


def test_a_results_folder_of_an_older_version_loads_reports_and_advises(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    res = report.load_results(folder)
    assert (len(res.records), len(res.stale), len(res.missing)) == (6, 0, 0)
    # The committed record files keep their names; the report reads them in place.
    assert sorted(p.name for p in (folder / "cells").iterdir()) == \
        sorted(p.name for p in (OLD / "cells").iterdir())
    text = open(report.write_report(folder, n_boot=50)).read()
    assert "6 done, 0 not applicable, 0 failed, 0 not run" in text
    advice = advisor.advise(folder, "minilm-l3", within=0.02)
    assert advice.method == "head" and advice.confidence is None  # 2 seeds: no figure
    assert "No confidence figure: fewer than 3 seeds" in str(advice)


def test_a_changed_override_orphans_cells_but_a_new_config_field_does_not(tmp_path):
    from adaptune import sweep

    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    grid = json.loads((folder / "grid.json").read_text())
    cells, _ = sweep.expand(sweep.grid_from_dict(grid))
    # Ids hash what the grid sets, not every field of RunConfig.
    assert all("max_length" not in json.dumps(c.settings) or
               c.settings["model"]["max_length"] == 64 for c in cells)
    grid["overrides"]["train"]["lr"] = 0.002
    (folder / "grid.json").write_text(json.dumps(grid))
    res = report.load_results(folder)
    # The LoRA cells ran at the old lr: stale. Head-only sets its own lr (method_overrides),
    # so its cells are still this grid's.
    assert len(res.stale) == 4 and {r["axes"]["method"] for r in res.records} == {"head"}


def test_default_drift_is_reported_not_dropped(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    path = next((folder / "cells").glob("minilm-l3-lora-r1-f1-s0-*.json"))
    record = json.loads(path.read_text())
    record["config"]["train"]["weight_decay"] = 0.1  # as if the default had been 0.1 then
    path.write_text(json.dumps(record))
    res = report.load_results(folder)
    assert len(res.records) == 6 and "train.weight_decay" in res.drift
    text = open(report.write_report(folder, n_boot=30)).read()
    assert "default changed since some cells ran: `train.weight_decay` is 0.01 now; " \
           "1 cell(s) with 0.1" in text


def test_backtest_refuses_fresh_cells_under_a_changed_default(tmp_path, monkeypatch):
    """The grid's cells ran before a default changed (model.dropout did not exist: the
    checkpoint's dropout then, "auto" now): fresh cells run here would test them under another
    protocol, so the backtest refuses before running any, naming the setting and the code the
    grid ran."""
    from adaptune import sweep
    from adaptune.errors import ConfigError
    from test_report import _advisor_fixture

    _advisor_fixture(tmp_path, spread=0.0005)
    for path in (tmp_path / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        record.update(config={"model": {"name": "m1"}}, code_version={"commit": "abc1234def"})
        path.write_text(json.dumps(record))
    monkeypatch.setattr(sweep, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    with pytest.raises(ConfigError, match=r'model.dropout: "checkpoint".*commit abc1234\b'):
        advisor.backtest(tmp_path, "m1", within=0.01, seeds=[7, 8, 9])
    assert not (tmp_path / "backtest" / "cells").exists()


def test_backtest_reruns_pick_and_rivals_on_fresh_seeds(tmp_path, monkeypatch):
    from adaptune import sweep
    from test_report import _advisor_fixture

    _advisor_fixture(tmp_path, spread=0.0005)
    fresh_means = {("lora", 4): 0.871, ("lora", 2): 0.80, ("lora", 16): 0.877,
                   ("lora", 1): 0.79, ("head", None): 0.70, ("lora", 8): 0.875}
    ran = []

    def fake_run_cell(cell, out, num_threads=0, environment=None, **_):
        ran.append((cell.method, cell.rank, cell.seed))
        value = fresh_means[(cell.method, cell.rank)]
        record = {"id": cell.id, "axes": cell.axes(), "status": "ok", "value": value,
                  "metric": "accuracy", "config": {}, **(environment or {})}
        sweep.write_json(Path(out) / "cells" / f"{cell.id}.json", record)
        return record

    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    with pytest.raises(Exception, match="seeds \\[0\\] are the grid's own"):
        advisor.backtest(tmp_path, "m1", within=0.01, seeds=[0, 7])
    summary = advisor.backtest(tmp_path, "m1", within=0.01, seeds=[7, 8, 9])
    assert summary["pick"] == "lora r=4" and summary["held"] is True
    assert summary["within_best"] is True
    # The pick, the best (r=16) and the cheapest cells just outside the tolerance, 3 seeds each.
    assert sorted({(m, r) for m, r, _ in ran}, key=str) == sorted(
        {("lora", 4), ("lora", 16), ("lora", 2), ("lora", 1)}, key=str)
    assert {s for _, _, s in ran} == {7, 8, 9}
    advisor.backtest(tmp_path, "m1", within=0.01, seeds=[7, 8, 9])  # resumes: nothing re-run
    assert len(ran) == 12
    text = open(report.write_report(tmp_path, n_boot=30)).read()
    assert "the promise was kept in 1 of 1 models; the advisor predicted 1.0 of 1; " \
        "the same pick in 1 of 1" in text

    # A cheaper rival (r=2) moves inside the tolerance on fresh seeds: the advisor would now
    # pick it (not held), but the pick itself is still within 0.01 of the best (0.871, 0.877).
    fresh_means[("lora", 2)] = 0.870
    shutil.rmtree(tmp_path / "backtest")
    summary = advisor.backtest(tmp_path, "m1", within=0.01, seeds=[7, 8, 9])
    assert summary["held"] is False and summary["within_best"] is True

    fresh_means[("lora", 4)] = 0.85  # on fresh seeds the pick falls outside the tolerance
    shutil.rmtree(tmp_path / "backtest")
    summary = advisor.backtest(tmp_path, "m1", within=0.01, seeds=[7, 8, 9])
    assert summary["held"] is False and summary["within_best"] is False
    text = open(report.write_report(tmp_path, n_boot=30)).read()
    assert "the promise was kept in 0 of 1 models" in text

    # With a confidence target the pick is the cheapest cell that is sure enough; its summary
    # is kept beside the point-means one and the report counts each rule on its own.
    summary = advisor.backtest(tmp_path, "m1", within=0.01, seeds=[7, 8, 9], confidence=0.8)
    assert summary["confidence_target"] == 0.8 and summary["pick"] == "lora r=4"
    assert summary["predicted_within_best"] > 0.95
    assert (tmp_path / "backtest" / "summary-m1-confidence0.8.json").exists()
    text = open(report.write_report(tmp_path, n_boot=30)).read()
    assert "- cheapest within tolerance in >= 80% of replications: the promise was kept in " \
        "0 of 1 models" in text and "| m1 | >= 80% | 0.01 | lora r=4 |" in text

    # The advice again on the grid's seeds and the fresh ones together: the re-run cells have
    # 4 + 3 seeds; r=4 (now 0.863) falls out of the tolerance of r=16 (0.876), and r=8, never
    # re-run, is the cheapest left in it.
    fresh = advisor.fresh_values(tmp_path, report.load_results(tmp_path),
                                 [("m1", "lora", r, 1.0) for r in (1, 2, 4, 8, 16)], [7, 8, 9])
    assert {k[2]: len(v) for k, v in fresh.items()} == {1: 3, 2: 3, 4: 3, 16: 3}
    pooled = advisor.advise(tmp_path, "m1", within=0.01, fresh_seeds=True)
    assert (pooled.rank, pooled.seeds) == (8, 4) and pooled.best == "lora r=16"
    assert pooled.best_mean == pytest.approx((4 * 0.876 + 3 * 0.877) / 7, abs=1e-3)
    assert advisor.advise(tmp_path, "m1", within=0.01).rank == 4  # the grid's seeds alone
    assert "| m1 | means | 0.01 | lora r=4 | lora r=8 | 4 |" in text


def test_dev_set_resampling_is_binomial_for_one_run_and_shared_across_runs():
    """Resampling per-example dev results: one run's metric varies as p(1 - p)/n, and two
    runs that agree on most examples move together (their difference varies far less than
    either)."""
    from adaptune.scaling import DevStats, Series

    rng = np.random.default_rng(0)
    n = 2000
    a = (rng.random(n) < 0.8).astype(float)
    b = a.copy()
    flip = rng.choice(n, size=100, replace=False)
    b[flip] = 1 - b[flip]  # the second run differs on 5% of the examples
    dev = DevStats([a[:, None], b[:, None]], lambda sums, count: sums[0] / count,
                   lambda metric: 1 - metric)
    series = Series.of([1.0, 2.0], [1 - a.mean(), 1 - b.mean()], dev=dev)
    noise = series.dev_noise(1000, np.random.default_rng(1))
    binomial = 0.8 * 0.2 / n
    assert noise[:, 0].var() == pytest.approx(binomial, rel=0.2)
    # Independent dev sets would give 2 x binomial for the difference; a shared one gives the
    # share of examples the runs disagree on, over n.
    assert (noise[:, 0] - noise[:, 1]).var() == pytest.approx(0.05 / n, rel=0.25)


def test_fits_use_per_example_dev_statistics_when_every_record_has_them():
    rng = np.random.default_rng(6)
    x = np.repeat(XS, 3)
    errors = E + A * x**-ALPHA + rng.normal(0, 0.004, len(x))
    from adaptune.scaling import DevStats

    stats = [(rng.random(872) > e).astype(float)[:, None] for e in errors]
    observed = [1 - s.mean() for s in stats]
    fit = fit_power_law(x, observed, n_boot=100,
                        dev=DevStats(stats, lambda sums, count: sums[0] / count,
                                     lambda metric: 1 - metric))
    assert fit.intervals and fit.held_out and np.isfinite(fit.held_out[0].band).all()


def _summary(model, rule_target, pick_fresh, best_fresh, held, predicted):
    return {"model": model, "within": 0.01, "pick": "lora r=4", "rivals": ["full"],
            "rule": advisor.rule_name(rule_target), "confidence_target": rule_target,
            "pick_committed_mean": 0.9, "pick_fresh_mean": pick_fresh,
            "fresh_means": {"lora r=4": pick_fresh, "full": best_fresh}, "fresh_seeds": [7],
            "held": held, "predicted_within_best": predicted, "higher_is_better": True}


def test_tally_counts_the_promise_over_folders_against_the_advisors_predictions(tmp_path):
    """Backtests of several results folders together: the promise (the pick within the
    tolerance of the best re-run cell) counted per rule, an exact interval, and the chance of
    keeping it this rarely if the advisor's own predictions were right, against brute force."""
    import itertools

    from adaptune.cli import main
    from adaptune.errors import ConfigError

    summaries = {"a": [_summary("m1", None, 0.90, 0.905, True, 0.9),
                       _summary("m2", None, 0.85, 0.90, False, 0.8),
                       _summary("m2", 0.8, 0.90, 0.90, False, 0.7)],
                 "b": [_summary("m3", None, 0.88, 0.885, False, 0.6),
                       _summary("m4", None, 0.88, 0.95, None, 0.9)]}  # undecided: not counted
    for name, rows in summaries.items():
        (tmp_path / name / "backtest").mkdir(parents=True)
        (tmp_path / name / "grid.json").write_text("{}")
        for i, row in enumerate(rows):
            (tmp_path / name / "backtest" / f"summary-{i}.json").write_text(json.dumps(row))
    t = advisor.tally([tmp_path / "a", tmp_path / "b"])
    means = t["rules"][advisor.rule_name(None)]
    assert (means["models"], means["kept"], means["same_pick"]) == (3, 2, 1)
    assert means["predicted"] == pytest.approx(0.9 + 0.8 + 0.6)
    chances = [0.9, 0.8, 0.6]
    brute = sum(np.prod([p if hit else 1 - p for p, hit in zip(chances, hits)])
                for hits in itertools.product([0, 1], repeat=3) if sum(hits) <= 2)
    assert means["chance_of_so_few"] == pytest.approx(brute)
    low, high = means["kept_ci95"]
    assert low < 2 / 3 < high and 0 < low and high < 1
    sure = t["rules"][advisor.rule_name(0.8)]
    assert (sure["models"], sure["kept"], sure["same_pick"]) == (1, 1, 0)
    assert sure["chance_of_so_few"] == pytest.approx(1.0)

    assert main(["backtests", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    (tmp_path / "c").mkdir()
    with pytest.raises(ConfigError, match="c: not a results folder"):
        advisor.tally([tmp_path / "c"])
    (tmp_path / "b" / "backtest" / "summary-0.json").unlink()  # m3: only m4, undecided, left
    with pytest.raises(ConfigError, match="no finished backtest"):
        advisor.tally([tmp_path / "b"])
