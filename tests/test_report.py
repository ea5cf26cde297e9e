"""Report, scaling-law fits and rank advisor on fixture results (no training)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from adaptune import advisor, report, sweep
from adaptune.safe_io import write_json
from adaptune.scaling import fit_joint_law, fit_power_law

SIZES = {"m1": 1e6, "m2": 4e6, "m3": 16e6, "m4": 64e6}
TRAIN = 1000  # examples at fraction 1


def _trainable(method: str, rank: int | None) -> int:
    return {"lora": 1000 * (rank or 0) + 100, "adalora": 1500 * (rank or 0) + 100, "head": 100,
            "full": 10**6}[method]


def _write_fixture(folder, error_of, *, models=("m1", "m2", "m3", "m4"),
                   methods=("lora", "head"), ranks=(1, 2, 4, 8, 16),
                   fractions=(0.25, 0.5, 1.0), seeds=(0, 1, 2), noise=0.002) -> sweep.Grid:
    """A results folder as `adaptune sweep` writes it, with metric = 1 - error_of(...) + noise."""
    grid = sweep.grid_from_dict({"name": "fixture", "task": "classification", "dataset": "sst2",
                                 "models": list(models), "methods": list(methods),
                                 "ranks": list(ranks), "fractions": list(fractions),
                                 "seeds": list(seeds),
                                 "lineages": {m: "fixture-ladder" for m in models}})
    write_json(folder / "grid.json", __import__("dataclasses").asdict(grid))
    rng = np.random.default_rng(0)
    for cell in sweep.expand(grid)[0]:
        n, d = SIZES[cell.model], TRAIN * cell.fraction
        value = 1 - error_of(cell.method, cell.rank, n, d) + rng.normal(0, noise)
        write_json(folder / "cells" / f"{cell.id}.json", {
            "id": cell.id, "status": "ok", "axes": cell.axes(), "metric": "accuracy",
            "value": value, "dev": {"accuracy": value},
            "trainable_params": _trainable(cell.method, cell.rank), "non_embedding_params": n,
            "train_examples": int(d), "tokens_seen": int(d) * 10, "wall_time_s": 1.0,
            "device": "fixture", "code_version": {"commit": "abc"}})
    return grid


def _law(method, rank, n, d):
    if method == "head":
        return 0.3 + 0.2 * (n / 1e6) ** -0.5
    return 0.1 + 0.4 * (n / 1e6) ** -0.3 * (d / 250) ** -0.2 + 0.02 * rank**-1.0


def test_report_on_a_fixture_folder(tmp_path):
    grid = _write_fixture(tmp_path, _law)
    cells = sweep.expand(grid)[0]
    # One cell failed, one never ran, one is left over from an earlier version of the grid.
    failed, missing = cells[0], cells[1]
    (tmp_path / "cells" / f"{failed.id}.json").rename(tmp_path / "failed.json")
    write_json(tmp_path / "failed" / f"{failed.id}.json", {"id": failed.id, "error": "boom"})
    (tmp_path / "cells" / f"{missing.id}.json").unlink()
    write_json(tmp_path / "cells" / "m1-lora-r3-f1-s0-deadbeef.json", {"status": "ok"})

    path = report.write_report(tmp_path, n_boot=200)
    text = open(path).read()
    assert "214 done, 0 not applicable, 1 failed, 1 not run, 1 stale" in text

    # A row computed by hand from the fixture files.
    values = [json.loads((tmp_path / "cells" / f"{c.id}.json").read_text())["value"]
              for c in cells if (c.model, c.method, c.rank, c.fraction) == ("m3", "lora", 8, 1.0)]
    mean, std = np.mean(values), np.std(values, ddof=1)
    flops = 4 * 16e6 * 1000 * 10 / 1e15  # 4N per token (frozen base) x tokens seen
    assert f"| m3 | 16.0M | lora | 8 | 1,000 | 3 | {mean:.4f} ± {std:.4f} | 8,100 | " \
           f"{flops:.3g} | 1 |" in text
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 6 * 3  # every (model, method, rank, fraction) with a result
    for name in ("error_vs_size", "error_vs_rank", "error_vs_data",
                 "metric_vs_trainable_params", "size_x_rank_heatmap"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"plots/{name}.png" in text

    fits = json.loads((tmp_path / "fits.json").read_text())
    size = fits["size"]["lora r=8"]
    assert size["verdict"] == "supported"
    assert size["intervals_95"]["alpha"][0] <= 0.3 <= size["intervals_95"]["alpha"][1]
    assert all(h["covered"] for h in size["held_out"]) and size["p_lack_of_fit"] > 0.05
    joint = fits["joint"]["lora r=8"]
    assert joint["verdict"] == "supported"
    assert joint["params"]["alpha"] == pytest.approx(0.3, abs=0.03)
    assert joint["params"]["beta"] == pytest.approx(0.2, abs=0.03)
    rank = fits["rank"]["m4 lora"]
    assert rank["verdict"] == "supported"
    assert rank["params"]["alpha"] == pytest.approx(1.0, abs=0.25)
    # Head-only does not depend on data: its data law must not be claimed.
    assert fits["data"]["m1 head"]["verdict"] != "supported"
    assert "## Which axis buys the most" in text and "Per doubling of parameters" in text


@pytest.mark.parametrize("alpha", [0.25, 0.6, 1.2])
def test_fit_recovers_known_exponent_from_noisy_data(alpha):
    rng = np.random.default_rng(int(alpha * 100))
    x = np.repeat([1, 2, 4, 8, 16, 32, 64], 3)
    y = 0.08 + 0.3 * x**-alpha + rng.normal(0, 0.003, len(x))
    fit = fit_power_law(x, y, n_boot=300)
    assert fit.supported, fit.verdict
    lo, hi = fit.intervals["alpha"]
    assert lo <= alpha <= hi and hi - lo < 0.6
    assert fit.params["alpha"] == pytest.approx(alpha, rel=0.25)
    assert fit.params["E"] == pytest.approx(0.08, abs=0.02)


def test_joint_fit_recovers_both_exponents():
    rng = np.random.default_rng(3)
    n, d = np.meshgrid([5e6, 1e7, 2e7, 8e7], [500, 1000, 2000, 4000])
    n, d = np.repeat(n.ravel(), 2), np.repeat(d.ravel(), 2)
    y = 0.05 + 2.0 * (n / 5e6) ** -0.3 * (d / 500) ** -0.2 + rng.normal(0, 0.003, len(n))
    fit = fit_joint_law(n, d, y, n_boot=150)
    assert fit.supported, fit.verdict
    for name, truth in (("alpha", 0.3), ("beta", 0.2)):
        lo, hi = fit.intervals[name]
        assert lo <= truth <= hi, (name, lo, hi)


def test_fits_refuse_what_the_data_do_not_support():
    rng = np.random.default_rng(5)
    x = np.repeat([1, 2, 4, 8, 16, 64], 3)
    flat = fit_power_law(x, 0.2 + rng.normal(0, 0.01, len(x)), n_boot=200)
    assert not flat.supported and "flat line" in flat.verdict
    assert flat.describe().startswith("not supported:")
    two = fit_power_law([1, 2], [0.3, 0.2], n_boot=10)
    assert "too few points" in two.verdict
    three = fit_power_law(np.repeat([1, 4, 16], 3), np.repeat([0.4, 0.2, 0.1], 3)
                          + rng.normal(0, 0.002, 9), n_boot=100)
    assert three.form == "pure" and three.params["E"] == 0.0  # no floor from 3 points
    one_seed = fit_power_law([1, 2, 4, 8], [0.4, 0.3, 0.25, 0.22], n_boot=50)
    assert "one seed per point" in one_seed.verdict


def _advisor_fixture(folder, spread: float):
    means = {("lora", 1): 0.80, ("lora", 2): 0.85, ("lora", 4): 0.872, ("lora", 8): 0.875,
             ("lora", 16): 0.876, ("head", None): 0.70}
    return _write_fixture(folder, lambda method, rank, n, d: 1 - means[(method, rank)],
                          models=("m1",), fractions=(1.0,), ranks=(1, 2, 4, 8, 16),
                          seeds=(0, 1, 2, 3), noise=spread)


def test_advisor_picks_fewest_parameters_within_tolerance(tmp_path):
    _advisor_fixture(tmp_path, spread=0.0005)
    advice = advisor.advise(tmp_path, "m1", within=0.01)
    # Within one point of the best (r=16, 0.876): r=4, 8, 16; r=4 has the fewest parameters.
    assert (advice.method, advice.rank) == ("lora", 4)
    assert advice.best == "lora r=16" and advice.confidence > 0.95
    assert "use lora r=4 (4,100 trainable parameters)" in str(advice)
    assert advisor.advise(tmp_path, "m1", within=0.2).method == "head"
    assert advisor.advise(tmp_path, "m1", within=0.0).rank == 16
    with pytest.raises(Exception, match="no finished cells for model 'm9'"):
        advisor.advise(tmp_path, "m9")


def test_backtest_rivals_skip_a_cell_that_trains_the_same_model():
    """rsLoRA at r=1 scales by alpha/sqrt(1) = alpha/r: the same run as LoRA r=1."""
    lora1, rs1 = ("m", "lora", 1, 1.0), ("m", "lora+rslora", 1, 1.0)
    rs4, dora1 = ("m", "lora+rslora", 4, 1.0), ("m", "dora", 1, 1.0)
    assert advisor.same_training(lora1, rs1) and advisor.same_training(rs1, lora1)
    assert not advisor.same_training(rs4, ("m", "lora", 4, 1.0))
    assert not advisor.same_training(dora1, lora1)
    assert not advisor.same_training(lora1, ("m", "lora", 1, 0.5))  # another data size
    assert advisor.distinct([rs4, lora1, rs1, dora1]) == [rs4, lora1, dora1]


def test_backtest_rivals_hold_the_runner_up_where_the_pick_is_the_best(tmp_path):
    """A pick that is the best cell and that no cheaper cell undercuts is re-run beside the
    runner-up: alone, its backtest could not fail (it would be the best of one)."""
    means = {("lora", 1): 0.80, ("lora", 2): 0.876, ("lora", 4): 0.872, ("lora", 8): 0.85}
    _write_fixture(tmp_path, lambda method, rank, n, d: 1 - means[(method, rank)],
                   models=("m1",), methods=("lora",), ranks=(1, 2, 4, 8), fractions=(1.0,),
                   seeds=(0, 1, 2), noise=0.0005)
    advice = advisor.advise(tmp_path, "m1", within=0.0)  # the best, r=2: only r=1 is cheaper
    assert advice.rank == 2 and [k[2] for k in advice.rivals] == [4, 1]  # runner-up, cheaper
    # Where the best is the cheapest cell, the runner-up is its one rival.
    means[("lora", 1)] = 0.90
    _write_fixture(tmp_path, lambda method, rank, n, d: 1 - means[(method, rank)],
                   models=("m1",), methods=("lora",), ranks=(1, 2, 4, 8), fractions=(1.0,),
                   seeds=(0, 1, 2), noise=0.0005)
    advice = advisor.advise(tmp_path, "m1", within=0.01)
    assert advice.rank == 1 and [k[2] for k in advice.rivals] == [2]


def test_method_table_says_when_a_row_has_no_interval():
    """An interim table (one seed so far) names the missing interval instead of [nan, nan]."""
    from types import SimpleNamespace

    def row(seeds: list[float]) -> dict:
        return {"model": "m", "method": "lora", "rank": 8, "seeds": len(seeds),
                "mean": float(np.mean(seeds)), "interval": report.t_interval(seeds),
                "trainable_params": 10, "memory_increase_mb": None, "train_time_s": None,
                "adapter_bytes": None, "lr": [1e-3], "p_vs_reference": None,
                "beats_reference": False}

    one, three = report.method_lines(SimpleNamespace(metric="f1"), [row([0.8]),
                                                                    row([0.8, 0.82, 0.81])])[7:9]
    assert "[one seed: none]" in one and "nan" not in one
    assert "0.8100 [0.7852, 0.8348]" in three


def test_advisor_is_less_sure_when_seeds_disagree(tmp_path):
    _advisor_fixture(tmp_path, spread=0.01)
    noisy = advisor.advise(tmp_path, "m1", within=0.005)
    assert noisy.confidence < 0.95


def test_a_confidence_target_trades_parameters_for_reliability(tmp_path):
    """On noisy seeds the point-means rule picks a cheap cell that is within the tolerance in
    few replications; a target picks a dearer, surer one, or the surest with the seeds that
    would make it sure enough."""
    _advisor_fixture(tmp_path, spread=0.01)
    means = advisor.advise(tmp_path, "m1", within=0.01)
    sure = advisor.advise(tmp_path, "m1", within=0.01, confidence=0.6)
    assert sure.target == 0.6 and sure.confidence >= 0.6
    assert sure.trainable_params >= means.trainable_params
    strict = advisor.advise(tmp_path, "m1", within=0.01, confidence=0.99)
    assert strict.confidence < 0.99 and "No cell reaches 99%: picked the most confident" \
        in strict.note and "seeds per cell" in strict.note
    with pytest.raises(Exception, match="confidence must lie strictly between 0 and 1.*1.5"):
        advisor.advise(tmp_path, "m1", confidence=1.5)


def test_simulated_confidence_grows_with_seeds_and_with_fewer_rivals():
    rng = np.random.default_rng(0)
    options = {("m", "lora", r, 1.0): list(0.80 + 0.004 * i + rng.normal(0, 0.01, 3))
               for i, r in enumerate((1, 2, 4, 8))}
    cheap, best = ("m", "lora", 1, 1.0), ("m", "lora", 8, 1.0)
    now = advisor.simulated_confidence(options, 1.0, 0.01)
    more = advisor.simulated_confidence(options, 1.0, 0.01, seeds=30)
    pair = advisor.simulated_confidence(options, 1.0, 0.01, among=[cheap, best])
    assert 0.05 < now[cheap] < 0.95 and more[best] > now[best]
    assert pair[cheap] >= now[cheap] - 1e-9  # the best of two is no higher than the best of four
    assert advisor.simulated_confidence({k: v[:2] for k, v in options.items()}, 1.0, 0.01) \
        is None


def test_report_and_advise_commands(tmp_path, capsys):
    from adaptune.cli import main

    _advisor_fixture(tmp_path, spread=0.0005)
    assert main(["report", str(tmp_path), "--bootstrap", "50"]) == 0
    assert (tmp_path / "report.md").exists() and (tmp_path / "results.csv").exists()
    assert main(["advise", str(tmp_path), "--model", "m1", "--within", "0.01"]) == 0
    assert "m1: use lora r=4" in capsys.readouterr().out
    assert main(["advise", str(tmp_path), "--model", "m9"]) == 2
    assert "no finished cells for model 'm9'" in capsys.readouterr().err


@pytest.mark.integration
def test_html_report_renders_in_a_headless_browser(tmp_path):
    """report.html is one self-contained file: a real headless Chromium renders it, decodes
    every embedded plot and shows the tables (.ci/run installs Debian's chromium)."""
    import os
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium: .ci/run installs it")
        pytest.skip("no chromium here (apt-get install chromium)")
    _write_fixture(tmp_path / "results", _law)
    report.write_report(tmp_path / "results", n_boot=30)
    page = tmp_path / "results" / "report.html"
    plots = sorted((tmp_path / "results" / "plots").glob("*.png"))
    shutil.rmtree(tmp_path / "results" / "plots")  # the page must not need them
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    dom = proc.stdout
    assert f'data-images-loaded="{len(plots)}/{len(plots)}"' in dom, proc.stderr[-2000:]
    assert dom.count("<table") >= 4 and "Scaling laws and their held-out checks" in dom


def test_train_time_is_dropped_where_an_old_resumed_run_counted_its_last_part_only():
    from adaptune.report import train_time

    fresh = {"train_time_s": 12.5, "resumed_from": None}
    old_rung = {"train_time_s": -3.9, "resumed_from": "work/x/checkpoints/step-63"}
    new_rung = {**old_rung, "train_time_s": 20.1, "times_cover": "whole run"}
    assert train_time(fresh) == 12.5
    assert train_time(old_rung) is None
    assert train_time(new_rung) == 20.1
