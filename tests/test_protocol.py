"""The scaling protocol: a selection split carved from train, decisions that never read dev,
early stopping, pausing and continuing a run, successive halving over learning rates, rsLoRA."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from adaptune import sweep
from adaptune.config import DataConfig, compose
from adaptune.errors import ConfigError
from adaptune.train import run
from conftest import tiny_config

WORDS = ["good", "great", "lovely", "warm", "fun", "joy", "bad", "awful", "dull", "cold",
         "mess", "bore"]


@pytest.fixture()
def unique_files(tmp_path) -> tuple[str, str]:
    """60 distinct training sentences (so "disjoint" can be checked by text) and a dev set."""
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < 60:
        words = rng.sample(WORDS, 3)
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        label = int(sum(w in WORDS[:6] for w in words) >= 2)
        rows.append(f"{text}\t{label}")
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    dev.write_text("text\tlabel\n" + "\n".join(rows[:12]) + "\n")
    return str(train), str(dev)


def _texts(examples) -> set[str]:
    return {e.text for e in examples}


def test_selection_split_is_disjoint_from_training_and_the_same_for_every_seed(unique_files):
    from adaptune.tasks.classification import ClassificationTask

    train, dev = unique_files
    task = ClassificationTask()
    base = dict(dataset="custom", train_path=train, dev_path=dev, selection_examples=10)
    selections = []
    for seed, fraction, cap in [(0, 1.0, 0), (1, 1.0, 0), (2, 0.5, 0), (3, 1.0, 7)]:
        cfg = DataConfig(**base, train_fraction=fraction, max_train_examples=cap)
        picked = task.load(cfg, "selection", seed)
        trained = task.load(cfg, "train", seed)
        assert len(picked) == 10
        assert not _texts(picked) & _texts(trained)  # never trained on
        selections.append(_texts(picked))
        if fraction == 1.0 and not cap:
            assert len(trained) == 50  # the rest of the file
    assert all(s == selections[0] for s in selections)  # independent of seed and data size
    other = task.load(DataConfig(**{**base, "selection_seed": 1}), "selection", 0)
    assert _texts(other) != selections[0]  # its own seed, recorded in the config
    with pytest.raises(ConfigError, match="data.selection_examples: 60 would leave no"):
        task.load(DataConfig(**{**base, "selection_examples": 60}), "train", 0)


def _spy_on_evaluations(monkeypatch, scores=None):
    """Record every evaluation's split; with `scores`, return those selection scores in turn
    (a synthetic learning curve) instead of evaluating."""
    from adaptune import train as flow

    calls: list[str] = []
    real = flow.Prepared.evaluate
    curve = iter(scores or [])

    def spy(self, model, device=None, *, with_stats=False, split="dev"):
        calls.append(split)
        if scores is not None and split == "selection":
            value = next(curve)
            out = {"accuracy": value, "f1": value}
            n = len(self.selection_examples)
            return (out, [[value]] * n) if with_stats else out
        return real(self, model, device, with_stats=with_stats, split=split)

    monkeypatch.setattr(flow.Prepared, "evaluate", spy)
    return calls


def test_decisions_read_the_selection_split_and_dev_only_for_the_kept_checkpoint(
        tiny_encoder, unique_files, tmp_path, monkeypatch):
    train, dev = unique_files
    # Selection scores that rise, fall, then rise again: kept = the best; dev is scored once,
    # after training, on the kept checkpoint's weights.
    calls = _spy_on_evaluations(monkeypatch, [0.5, 0.7, 0.6, 0.8, 0.75, 0.7])
    cfg = tiny_config(tiny_encoder, train, dev, tmp_path / "run",
                      data={"selection_examples": 10}, train={"max_steps": 12, "eval_every": 2})
    result = run(cfg)
    m = result.metrics
    assert calls == ["selection"] * 6 + ["dev"]
    # The reported dev score is the kept (step-8) adapter's, as a user reloading it sees it.
    import adaptune
    from conftest import dev_accuracy_of_predictions

    assert dev_accuracy_of_predictions(adaptune.load(result.adapter_dir), dev) == \
        pytest.approx(m["dev"]["accuracy"])
    assert m["selected_on"] == "selection" and m["best_step"] == 8
    assert m["selection"]["accuracy"] == 0.8
    assert m["selection_examples"] == 10
    assert not m["stopped_early"] and m["optimizer_steps"] == 12


def test_early_stopping_stops_on_a_plateau(tiny_encoder, unique_files, tmp_path, monkeypatch):
    train, dev = unique_files
    _spy_on_evaluations(monkeypatch, [0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    cfg = tiny_config(tiny_encoder, train, dev, tmp_path / "run",
                      data={"selection_examples": 10},
                      train={"max_steps": 16, "eval_every": 2, "early_stopping_patience": 2})
    m = run(cfg).metrics
    # Evaluations at steps 2 (best), 4 and 6 (no improvement twice): stop at step 6.
    assert m["stopped_early"] and m["optimizer_steps"] == 6 and m["planned_steps"] == 16
    assert m["best_step"] == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["optimizer_steps"] == 6


def test_early_stopping_without_a_selection_split_is_refused():
    with pytest.raises(ConfigError, match="early_stopping_patience needs a selection split"):
        compose({"train": {"early_stopping_patience": 3}})


def _trainable(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_a_paused_run_continues_exactly_as_one_run(tiny_encoder, unique_files, tmp_path):
    train, dev = unique_files
    common = dict(data={"selection_examples": 10}, train={"max_steps": 8, "eval_every": 4})
    whole = run(tiny_config(tiny_encoder, train, dev, tmp_path / "whole", **common))
    paused_cfg = tiny_config(tiny_encoder, train, dev, tmp_path / "paused", **common)
    first = run(paused_cfg.replace(train={"pause_at_fraction": 0.5}))
    assert first.metrics["paused"] and first.metrics["optimizer_steps"] == 4
    assert not (tmp_path / "paused" / "metrics.json").exists()  # not finished
    rest = run(paused_cfg)  # the same run, no pause: continues from step 4
    assert rest.metrics["resumed_from"] and rest.metrics["optimizer_steps"] == 8
    assert rest.metrics["dev"] == pytest.approx(whole.metrics["dev"])
    a, b = _trainable(tmp_path / "whole"), _trainable(tmp_path / "paused")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_paused_run_counts_the_time_of_its_first_part(tiny_encoder, unique_files, tmp_path,
                                                        monkeypatch):
    """A run resumed from a pause (a halving rung) reports the whole run's wall and training
    time. Before the fix its checkpoint carried no elapsed time but all the evaluations'
    overhead, so train_time_s came out as the second part's wall minus both parts' evaluations:
    negative in committed sweep records. Evaluations here take 0.3 s each to make that plain."""
    from adaptune import train as flow

    real = flow.Prepared.evaluate

    def slow(self, *args, **kwargs):
        time.sleep(0.3)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(flow.Prepared, "evaluate", slow)
    train, dev = unique_files
    cfg = tiny_config(tiny_encoder, train, dev, tmp_path / "run",
                      data={"selection_examples": 10}, train={"max_steps": 8, "eval_every": 2})
    first = run(cfg.replace(train={"pause_at_fraction": 0.5})).metrics
    rest = run(cfg).metrics
    assert rest["resumed_from"] and rest["times_cover"] == "whole run"
    assert first["wall_time_s"] > 0.6  # two evaluations in the first part
    # The whole run's wall holds both parts (the second has 2 more evaluations and dev).
    assert rest["wall_time_s"] > first["wall_time_s"] + 0.6
    assert 0 < first["train_time_s"] < first["wall_time_s"]
    assert first["train_time_s"] <= rest["train_time_s"] < rest["wall_time_s"]


def _record(score: float) -> dict:
    return {"status": "ok", "metric": "accuracy", "selection": {"accuracy": score}}


def test_successive_halving_keeps_the_best_lr_on_synthetic_curves():
    """Curves that rise towards an lr's own ceiling at an lr's own speed (faster for larger lrs),
    with evaluation noise: the lr with the best final score survives every cut in at least 95%
    of 200 noisy draws (ceilings 0.02 or more apart, noise sd 0.005). What successive halving
    assumes, and what this checks, is that a short rung already ranks the lrs roughly as the
    whole run does; a curve that overtakes late would be cut."""
    import math

    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    ceiling = {lr: 0.90 - 0.04 * abs(math.log10(lr) + 2.5) for lr in lrs}  # best: 3e-3
    speed = {lr: 0.8 + 0.05 * i for i, lr in enumerate(lrs)}
    best = max(lrs, key=ceiling.get)
    kept_best = 0
    for draw in range(200):
        rng = random.Random(draw)
        alive, rungs, eta = list(lrs), 3, 3
        for rung in range(rungs - 1):
            budget = eta ** (rung - (rungs - 1))
            scores = {lr: ceiling[lr] * (1 - 0.5 * math.exp(-budget * 20 * speed[lr]))
                      + rng.gauss(0, 0.005) for lr in alive}
            alive = sweep.survivors({lr: _record(s) for lr, s in scores.items()}, eta, True)
        assert len(alive) == 1
        kept_best += best in alive
    assert kept_best >= 190
    # Lower is better (perplexity): the cut keeps the smallest.
    picked = sweep.survivors({1e-3: _record(5.0), 1e-2: _record(3.0), 1e-1: _record(9.0)}, 3,
                             False)
    assert picked == [1e-2]
    # A skipped lr is never kept; ties go to the smaller lr.
    assert sweep.survivors({1e-3: {"status": "skipped"}, 1e-2: _record(0.5),
                            1e-1: _record(0.5)}, 3, True) == [1e-2]


def test_closest_cut_names_the_narrowest_decision_of_a_search():
    """The report's fragility figure: the gap between the worst lr a rung kept and the best it
    cut, at the step of that rung. Exact ties (lrs at an F1 of 0 alike) are the tie-break's,
    not a decision; a search without a cut has none."""
    from adaptune.report import closest_cut

    def run(lr, rung, score, step):
        return {"status": "ok", "metric": "f1", "selection": {"f1": score},
                "optimizer_steps": step, "axes": {"lr": lr, "rung": rung}}

    # conll_ladder's minilm-l6 full fine-tuning, fresh seed 1002 (3 rungs, eta 3): 3e-4 was
    # cut at step 21 by 0.024, below the 0.5-point gap of the later rung.
    search = [run(3e-5, 0, 0.000, 21), run(1e-4, 0, 0.267, 21), run(3e-4, 0, 0.132, 21),
              run(1e-3, 0, 0.156, 21), run(1e-4, 1, 0.574, 63), run(1e-3, 1, 0.632, 63),
              run(1e-3, 2, 0.766, 189)]
    gap, step = closest_cut(search, 3, True)
    assert step == 21 and gap == pytest.approx(0.156 - 0.132)
    # Ties at 0 are left out: the decision that counts is the one at step 63.
    tied = [run(3e-5, 0, 0.0, 21), run(1e-4, 0, 0.0, 21), run(3e-4, 0, 0.218, 21),
            run(1e-3, 0, 0.0, 21), run(3e-5, 1, 0.006, 63), run(3e-4, 1, 0.667, 63),
            run(3e-4, 2, 0.853, 189)]
    assert closest_cut(tied, 3, True) == (pytest.approx(0.661), 63)
    # Lower is better: the gap is still positive, in the metric's units.
    loss = [run(1e-3, 0, 5.0, 10), run(1e-2, 0, 3.0, 10), run(1e-1, 0, 3.5, 10),
            run(1e-2, 1, 2.5, 30)]
    assert closest_cut(loss, 3, False) == (pytest.approx(0.5), 10)
    assert closest_cut([run(1e-3, 0, 0.5, 30)], 3, True) is None


def _grid(tiny_encoder, files, **changes) -> dict:
    train, dev = files
    grid = {"name": "lr-search", "task": "classification", "models": [tiny_encoder],
            "methods": ["lora"], "ranks": [2], "seeds": [0], "lrs": [1e-5, 5e-3, 3e-2],
            "halving": {"rungs": 2, "eta": 3},
            "overrides": {"model": {"max_length": 32},
                          "data": {"dataset": "custom", "train_path": train, "dev_path": dev,
                                   "selection_examples": 10},
                          "train": {"max_steps": 6, "eval_every": 2, "batch_size": 8,
                                    "precision": "fp32", "warmup_ratio": 0.0}}}
    grid.update(changes)
    return grid


def test_lr_search_by_successive_halving_end_to_end(tiny_encoder, unique_files, tmp_path):
    from adaptune.report import load_results

    grid = sweep.grid_from_dict(_grid(tiny_encoder, unique_files))
    out = tmp_path / "sweep"
    summary = sweep.run_grid(grid, out)
    assert (summary.done, summary.pruned, summary.total) == (4, 2, 4)
    records = {json.loads(p.read_text())["axes"]["lr"]: json.loads(p.read_text())
               for p in (out / "cells").glob("*-rung0.json")}
    assert sorted(records) == [1e-5, 5e-3, 3e-2]
    assert all(r["paused"] and r["optimizer_steps"] == 2 for r in records.values())
    winner = max(records, key=lambda lr: (records[lr]["selection"]["accuracy"], -lr))
    final = [json.loads(p.read_text()) for p in (out / "cells").glob("*-rung1.json")]
    assert len(final) == 1 and final[0]["axes"]["lr"] == winner
    assert final[0]["optimizer_steps"] == 6 and final[0]["resumed_from"]  # continued, not anew
    assert not list((out / "work").iterdir())  # no checkpoint left behind
    # A rerun finds everything done (the cut lrs are not "missing").
    again = sweep.run_grid(grid, out)
    assert (again.done, again.pruned) == (4, 2)
    res = load_results(out)
    assert [r["selected_lr"] for r in res.records] == [winner]
    assert "lr" not in res.records[0]["axes"]  # the report's cell is the search, not one lr
    (search,) = res.searches
    assert search["steps"] == 3 * 2 + 6 - 2  # three lrs for 2 steps, one continued to 6
    assert search["steps_without_halving"] == 3 * 6
    # The cut was decided at rung 0's step 2 (unless all three lrs tied: then no cut counts).
    assert search["closest_cut"] is None or (search["closest_cut"][1] == 2
                                             and search["closest_cut"][0] > 0)
    assert res.missing == []


def test_three_rungs_cut_twice_and_finish(tiny_encoder, unique_files, tmp_path):
    from adaptune.report import load_results

    grid = sweep.grid_from_dict(_grid(tiny_encoder, unique_files, halving={"rungs": 3, "eta": 2},
                                      lrs=[1e-5, 1e-3, 5e-3, 3e-2]))
    out = tmp_path / "sweep"
    summary = sweep.run_grid(grid, out)
    # 4 lrs at rung 0, the best 2 at rung 1, the best 1 at rung 2; 12 cells, 5 cut.
    assert (summary.done, summary.pruned, summary.total) == (7, 5, 7)
    rungs = sorted(json.loads(p.read_text())["axes"]["rung"] for p in (out / "cells").glob("*"))
    assert rungs == [0, 0, 0, 0, 1, 1, 2]
    steps = {json.loads(p.read_text())["axes"]["rung"]: json.loads(p.read_text())["optimizer_steps"]
             for p in (out / "cells").glob("*")}
    assert steps == {0: 2, 1: 3, 2: 6}  # ceil(6/4), ceil(6/2), all 6
    assert len(load_results(out).records) == 1


def test_grids_that_select_lrs_need_a_selection_split(tiny_encoder, unique_files):
    bad = _grid(tiny_encoder, unique_files)
    del bad["overrides"]["data"]["selection_examples"]
    with pytest.raises(ConfigError, match="set overrides.data.selection_examples"):
        sweep.grid_from_dict(bad)
    with pytest.raises(ConfigError, match="halving: expected rungs >= 1 and eta >= 2"):
        sweep.grid_from_dict(_grid(tiny_encoder, unique_files, halving={"rungs": 2, "eta": 1}))
    with pytest.raises(ConfigError, match="method_lrs: 'full' is not in methods"):
        sweep.grid_from_dict(_grid(tiny_encoder, unique_files, method_lrs={"full": [1e-4]}))


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_encoder, unique_files, tmp_path):
    from peft.tuners.lora import LoraLayer

    from adaptune.train import setup, prepare

    train, dev = unique_files
    for scaling, expected in [("alpha/r", 16 / 4), ("rslora", 16 / 2)]:
        cfg = tiny_config(tiny_encoder, train, dev, tmp_path / scaling.replace("/", "_"),
                          method={"rank": 4, "alpha": 16, "scaling": scaling})
        model = setup(prepare(cfg)).model
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.scaling["default"] == pytest.approx(expected) for m in layers)
    with pytest.raises(ConfigError, match="method.scaling=rslora applies to LoRA-style"):
        compose({"method": {"name": "bitfit", "scaling": "rslora"}})
    grid = sweep.grid_from_dict(_grid(tiny_encoder, unique_files, methods=["lora", "head"],
                                      scalings=["alpha/r", "rslora"], lrs=[], halving={},
                                      method_lrs={}))
    cells, skipped = sweep.expand(grid)
    assert sorted((c.method, c.scaling) for c in cells) == [
        ("head", None), ("lora", "alpha/r"), ("lora", "rslora")]
    assert "head: the scaling axis does not apply" in skipped


def test_memory_peak_sees_an_allocation_inside_the_run_only():
    import time

    from adaptune.train import MemoryPeak

    before = torch.ones(8 * 2**20)  # 32 MiB held before: part of the baseline, not the increase
    with MemoryPeak() as memory:
        block = torch.ones(64 * 2**20)  # 256 MiB
        time.sleep(0.1)
        del block
    assert memory.peak_mb - memory.baseline_mb >= 200
    assert memory.baseline_mb >= 32
    del before


def test_runs_record_their_adapter_size_and_memory(tiny_encoder, unique_files, tmp_path):
    train, dev = unique_files
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "run")).metrics
    files = sum(f.stat().st_size for f in (tmp_path / "run" / "adapter").glob("*.safetensors"))
    assert m["adapter_bytes"] == files > 0
    assert m["train_peak_memory_mb"] > 0 and m["train_memory_increase_mb"] >= 0


def test_method_comparison_table_and_peft_layout(tiny_encoder, unique_files, tmp_path):
    from adaptune.report import write_report

    grid = sweep.grid_from_dict(_grid(tiny_encoder, unique_files, methods=["lora", "ia3", "head"],
                                      ranks=[8], seeds=[0, 1, 2], lrs=[5e-3], halving={}))
    out = tmp_path / "methods"
    sweep.run_grid(grid, out)
    text = open(write_report(out, n_boot=20)).read()
    section = text.split("## Methods compared")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {tiny_encoder} |")]
    assert [row.split(" | ")[1] for row in rows] == ["head", "ia3", "lora"]
    assert all(" [" in row for row in rows)  # an interval for every method (3 seeds)
    files = sorted((out / "peft_method_comparison").glob("*.json"))
    assert len(files) == 9
    data = json.loads(files[0].read_text())
    assert set(data) == {"run_info", "train_info", "meta_info"}
    info = data["train_info"]
    assert info["num_trainable_params"] > 0 and info["file_size"] > 0
    assert info["metrics"][-1]["test accuracy"] is not None
    assert "valid accuracy" in info["metrics"][0]

    # A folder written by an older adaptune (records without fields added since, such as
    # train.compile) still gets its report and peft records.
    for path in (out / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        for field in ("compile", "eval_batch_size", "max_grad_norm"):
            record["config"]["train"].pop(field, None)
        path.write_text(json.dumps(record))
    write_report(out, n_boot=20)
    old = json.loads(sorted((out / "peft_method_comparison").glob("*.json"))[0].read_text())
    config = old["run_info"]["train_config"]
    assert config["compile"] is False and config["grad_norm_clip"] is None


def test_evals_per_epoch_follow_the_data_size():
    from adaptune.train import make_plan

    cfg = compose({"train": {"epochs": 3, "batch_size": 10, "evals_per_epoch": 3}})
    assert make_plan(cfg, 300, 1).eval_every == 10  # 30 steps an epoch
    assert make_plan(cfg, 3000, 1).eval_every == 100
    with pytest.raises(ConfigError, match="one or the other"):
        compose({"train": {"eval_every": 5, "evals_per_epoch": 3}})
