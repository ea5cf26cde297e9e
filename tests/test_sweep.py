"""The benchmark runner: grid expansion, stable ids, skip-on-restart, kills mid-cell."""

from __future__ import annotations

import json

import pytest

from adaptune import sweep
from adaptune.errors import ConfigError
from conftest import run_victim, tiny_grid


def _grid_dict(model: str, cls_files, **changes) -> dict:
    return tiny_grid(model, cls_files, **changes)


def test_expansion_counts_order_and_skipped_axes():
    grid = sweep.grid_from_dict({"name": "g", "task": "classification", "dataset": "sst2",
                                 "models": ["minilm-l3", "minilm-l6"],
                                 "methods": ["lora", "adalora", "bitfit", "full", "head"],
                                 "ranks": [1, 8, 64], "fractions": [0.5, 1.0], "seeds": [0, 1]})
    cells, skipped = sweep.expand(grid)
    # per seed and model: (2 ranked methods x 3 ranks + 3 unranked) x 2 fractions
    assert len(cells) == 2 * 2 * (2 * 3 + 3) * 2
    assert len({c.id for c in cells}) == len(cells)
    assert sorted(s.split(":")[0] for s in skipped) == ["bitfit", "full", "head"]
    assert all(c.rank is None for c in cells if c.method in ("bitfit", "full", "head"))
    # Seed-major: every cell of seed 0 comes before any of seed 1.
    seeds = [c.seed for c in cells]
    assert seeds == sorted(seeds)
    first = cells[0]
    assert (first.model, first.method, first.rank, first.fraction) == ("minilm-l3", "lora", 1, 0.5)
    assert first.config.method.rank == 1 and first.config.data.train_fraction == 0.5
    assert first.id.startswith("minilm-l3-lora-r1-f0.5-s0-")


def test_ids_are_stable_and_follow_the_config():
    base = {"name": "g", "task": "classification", "dataset": "sst2", "methods": ["lora"],
            "ranks": [4], "overrides": {"train": {"lr": 1e-3}}}
    ids = [c.id for c in sweep.expand(sweep.grid_from_dict(base))[0]]
    reordered = dict(reversed(list(base.items())))
    assert ids == [c.id for c in sweep.expand(sweep.grid_from_dict(reordered))[0]]
    # A hard-coded id: a code change that silently renames cells (and so reruns every finished
    # cell of every results folder) must show up here.
    assert ids == ["minilm-l6-lora-r4-f1-s0-" + ids[0].rsplit("-", 1)[1]]
    changed = {**base, "overrides": {"train": {"lr": 2e-3}}}
    assert ids != [c.id for c in sweep.expand(sweep.grid_from_dict(changed))[0]]


def test_the_device_of_a_cpu_record_names_its_vector_instructions(monkeypatch):
    # Two CPUs of one model name can run different kernels (AVX2 against AVX512), and their
    # results differ in the last digits: a record must say which ran it.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name = sweep.device_name()
    assert name.startswith("CPU (") and name.endswith(f"{torch.backends.cpu.get_cpu_capability()})")


def test_model_overrides_change_only_that_models_cells():
    base = {"name": "g", "task": "classification", "dataset": "sst2", "methods": ["lora"],
            "models": ["minilm-l6", "mpnet-base"], "method_overrides": {"lora": {"train": {
                "lr": 1e-3}}}}
    plain = sweep.expand(sweep.grid_from_dict(base))[0]
    per_model = sweep.expand(sweep.grid_from_dict({**base, "model_overrides": {"mpnet-base": {
        "method": {"targets": ["q", "v"]}, "train": {"lr": 5e-4}}}}))[0]
    assert plain[0].id == per_model[0].id  # minilm-l6: untouched
    assert plain[1].id != per_model[1].id
    # The method's override wins over the model's (it is applied later).
    assert per_model[1].config.method.targets == ("q", "v")
    assert per_model[1].config.train.lr == 1e-3


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"methods": ["lora", "prefix"]}, r"methods: 'prefix' is not one of"),
    ({"ranks": [4, 4]}, r"ranks lists a value twice"),
    ({"fractions": [0.0]}, r"fractions must be in \(0, 1\]"),
    ({"seeds": "x"}, r"seeds: expected a list of int"),
    ({"overrides": {"train": {"lr": "fast"}}}, r"train\.lr"),
    ({"overrides": {"trian": {"lr": 1}}}, r"trian"),
    ({"overrides": {"model": {"name": "x"}}}, r"overrides\.model\.name is an axis"),
    ({"method_overrides": {"full": {}}}, r"method_overrides: 'full' is not in methods"),
    ({"model_overrides": {"gpt2": {}}}, r"model_overrides: 'gpt2' is not in models"),
    ({"model_overrides": {"minilm-l6": {"train": {"lr": -1}}}},
     r"model 'minilm-l6', method 'lora': train\.lr"),
])
def test_bad_grids_name_the_file_and_key(tmp_path, change, message):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "task": "classification", "dataset": "sst2",
                                    "methods": ["lora"], **change}))
    with pytest.raises(ConfigError, match=message) as info:
        sweep.load_grid(path)
    assert str(path) in str(info.value) or "grid 'g'" in str(info.value)


def test_runs_every_cell_once_and_skips_finished_cells_on_restart(tiny_encoder, cls_files,
                                                                   tmp_path, monkeypatch):
    grid = sweep.grid_from_dict(_grid_dict(tiny_encoder, cls_files))
    out = tmp_path / "results"
    summary = sweep.run_grid(grid, out)
    cells, _ = sweep.expand(grid)
    assert summary.done == summary.total == 3 and not summary.failed
    records = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(records) == {c.id for c in cells}
    lora = next(r for r in records.values() if r["axes"]["rank"] == 4)
    assert lora["status"] == "ok" and lora["metric"] == "accuracy"
    for key in ("trainable_params", "non_embedding_params", "tokens_seen", "wall_time_s",
                "code_version", "libraries", "device", "config", "precision"):
        assert key in lora, key
    assert lora["attention"] in ("sdpa", "eager")  # the kernel it trained with (auto: measured)
    assert lora["libraries"]["peft"] and lora["code_version"]["adaptune"]
    assert lora["tokens_seen"] > 0 and lora["optimizer_steps"] == 4
    assert not (out / "work").exists() or not any((out / "work").iterdir())

    ran = []
    monkeypatch.setattr(sweep, "run_cell", lambda cell, *a, **k: ran.append(cell.id))
    again = sweep.run_grid(grid, out)
    assert ran == [] and again.done == 3

    # Editing the grid (one rank fewer) moves the dropped cell's record aside, not away.
    smaller = sweep.grid_from_dict(_grid_dict(tiny_encoder, cls_files, ranks=[4]))
    assert sweep.run_grid(smaller, out).done == 2 and ran == []
    assert [p.stem for p in (out / "stale").glob("*.json")] == \
        [c.id for c in cells if c.rank == 2]


def test_not_applicable_cells_are_recorded_as_skipped(tiny_decoder, cls_files, tmp_path):
    grid = sweep.grid_from_dict(_grid_dict(tiny_decoder, cls_files, methods=["bitfit"],
                                           ranks=[4]))
    summary = sweep.run_grid(grid, tmp_path / "results")
    assert summary.done == 1 and not summary.failed
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results/cells").glob("*.json")]
    assert record["status"] == "skipped" and "no bias parameters" in record["reason"]


def test_a_failing_cell_is_recorded_and_retried(tiny_encoder, cls_files, tmp_path, monkeypatch):
    grid = sweep.grid_from_dict(_grid_dict(tiny_encoder, cls_files, methods=["head"]))
    out = tmp_path / "results"
    real = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda *a, **k: 1 / 0)
    summary = sweep.run_grid(grid, out)
    assert summary.done == 0 and len(summary.failed) == 1
    failed = json.loads((out / "failed" / f"{summary.failed[0]}.json").read_text())
    assert "ZeroDivisionError" in failed["error"]
    monkeypatch.setattr(sweep, "run_cell", real)
    summary = sweep.run_grid(grid, out)
    assert summary.done == 1 and summary.failed == []


@pytest.mark.integration
@pytest.mark.parametrize("kill_at", ["mid-training", "before-record"])
def test_killed_sweep_restarts_to_a_complete_set(tiny_encoder, cls_files, tmp_path, kill_at):
    """SIGKILL the runner inside the second cell (during training, or after the run finished
    but before its record is written); the restart must end with every cell exactly once."""
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(_grid_dict(tiny_encoder, cls_files)))
    out = tmp_path / "results"
    run_victim(tmp_path, f"""
        from adaptune import sweep
        cells = [0]
        if {kill_at!r} == "before-record":
            original_write = sweep.write_json
            def write(path, data):
                if path.parent.name == "cells":
                    cells[0] += 1
                    if cells[0] == 2:
                        die()
                return original_write(path, data)
            sweep.write_json = write
        grid = sweep.grid_from_dict(json.loads(open({str(grid_file)!r}).read()))
        sweep.run_grid(grid, {str(out)!r})
    """, kill_at_clip=4 + 2 if kill_at == "mid-training" else None)  # cell 1 takes 4 steps
    assert len(list((out / "cells").glob("*.json"))) == 1  # only the first cell counts
    assert any((out / "work").iterdir())  # the second cell's half-done run is there

    grid = sweep.grid_from_dict(json.loads(grid_file.read_text()))
    summary = sweep.run_grid(grid, out)
    ids = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert ids == sorted(c.id for c in sweep.expand(grid)[0]) and summary.done == 3
    for path in (out / "cells").glob("*.json"):
        assert json.loads(path.read_text())["status"] == "ok"
    assert not list((out / "cells").glob(".tmp-*"))
    assert not any((out / "work").iterdir())


def test_a_live_processs_claim_is_never_cleared(tmp_path):
    """Restarting a sweep frees the claims of dead workers only: a claim held by a live process
    (a worker of a sweep still running) stays, so no cell is trained twice at once."""
    import os
    import subprocess
    import sys

    locks = tmp_path / "locks"
    locks.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (locks / "cell-of-a-dead-worker").write_text(dead)
    (locks / "cell-of-a-live-worker").write_text(str(os.getpid()))
    (locks / "cell-with-a-torn-claim").write_text("")
    assert sweep.clear_dead_claims(tmp_path) == ["cell-of-a-dead-worker", "cell-with-a-torn-claim"]
    assert sorted(p.name for p in locks.iterdir()) == ["cell-of-a-live-worker"]


@pytest.mark.integration
def test_a_worker_runs_the_coordinators_adaptune_from_any_directory(tmp_path):
    """A sweep started from a checkout with another version's code on the path (a git worktree
    of the grid's commit) must not have its workers import the checkout's adaptune, which
    `python -m` from the working directory would."""
    import subprocess

    decoy = tmp_path / "adaptune"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('imported the checkout in the cwd')\n")
    # The worker's argument parser answers: the decoy (exit status 1) was not imported.
    done = subprocess.run(sweep.worker_command("--help"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--worker" in done.stdout, done.stderr


@pytest.mark.integration
def test_workers_die_with_a_killed_sweep(tiny_encoder, cls_files, tmp_path):
    """SIGKILL the sweep (no cleanup runs in it): its workers get SIGTERM from the kernel, stop
    at their next step, and leave no process behind to race a restarted sweep."""
    import os
    import signal
    import subprocess
    import sys
    import time

    grid = _grid_dict(tiny_encoder, cls_files)
    grid["overrides"]["train"]["max_steps"] = 5000  # minutes a cell: killed in the middle
    # So long a run would have compile=auto measure the compile (seconds of compiling, and
    # an entry in the user's cache folder): not what this test is about.
    grid["overrides"]["train"]["compile"] = "off"
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(grid))
    out = tmp_path / "results"
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "ADAPTUNE_CACHE": str(tmp_path / "cache")}  # measurements stay in the test's folder
    parent = subprocess.Popen(
        [sys.executable, "-c", "import json, sys; from adaptune import sweep; "
         f"sweep.run_grid(sweep.grid_from_dict(json.load(open({str(grid_file)!r}))), "
         f"{str(out)!r}, workers=2)"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)

    def workers() -> list[str]:
        found = subprocess.run(["pgrep", "-f", f"_worker_main.* --worker {out}"],
                               capture_output=True, text=True).stdout.split()
        return found

    deadline = time.time() + 120
    while len(workers()) < 2 or not list((out / "work").glob("*/config.json")):
        assert time.time() < deadline, "the workers did not start training"
        time.sleep(0.5)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # A step takes milliseconds and a cell minutes, but a stopped worker saves its checkpoint and
    # exits: on 2 busy cores that took just over 20 s once, so allow 60 (still far under a cell).
    deadline = time.time() + 60
    while workers():
        assert time.time() < deadline, f"workers outlived the sweep: {workers()}"
        time.sleep(0.5)


def test_method_ranks_give_a_method_its_own_rank_axis():
    grid = sweep.grid_from_dict({"name": "g", "task": "classification", "dataset": "sst2",
                                 "methods": ["lora", "adalora", "vera"], "ranks": [4, 8],
                                 "method_ranks": {"vera": [256], "adalora": [8]}})
    cells, _ = sweep.expand(grid)
    assert sorted((c.method, c.rank) for c in cells) == [
        ("adalora", 8), ("lora", 4), ("lora", 8), ("vera", 256)]
    with pytest.raises(ConfigError, match="method_ranks: head has no rank"):
        sweep.grid_from_dict({"name": "g", "task": "classification", "methods": ["lora", "head"],
                              "method_ranks": {"head": [4]}})


def test_a_sweep_shows_cells_complete_and_an_eta(tiny_encoder, cls_files, tmp_path, capsys):
    grid = sweep.grid_from_dict(_grid_dict(tiny_encoder, cls_files, methods=["head"],
                                           seeds=[0, 1, 2]))
    sweep.run_grid(grid, tmp_path / "out")
    lines = [line for line in capsys.readouterr().out.splitlines() if "cells complete" in line]
    assert len(lines) == 3
    assert "(0/3 cells complete)" in lines[0]
    assert "(1/3 cells complete, ETA" in lines[1] and "(2/3 cells complete, ETA" in lines[2]


@pytest.mark.integration
def test_ray_launcher_runs_every_cell_once_on_a_local_ray(tiny_encoder, cls_files, tmp_path):
    ray = pytest.importorskip("ray")
    grid = sweep.grid_from_dict(_grid_dict(tiny_encoder, cls_files, seeds=[0, 1]))
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        # Packs of 2 inside the Ray tasks: the LoRA ranks of one seed train together.
        summary = sweep.run_grid(grid, out, workers=2, launcher="ray", pack=2)
    finally:
        ray.shutdown()
    cells, _ = sweep.expand(grid)
    assert (summary.done, summary.total) == (len(cells), len(cells))
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert sorted(r["id"] for r in records) == sorted(c.id for c in cells)  # each exactly once
    assert any(r.get("pack", {}).get("size") == 2 for r in records)
    assert not list((out / "locks").iterdir())


def test_claims_of_other_machines_expire_only_when_untouched(tmp_path):
    import os
    import time

    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "fresh").write_text("another-host 123")
    (locks / "lost").write_text("another-host 456")
    old = time.time() - sweep.STALE_CLAIM_S - 5
    os.utime(locks / "lost", (old, old))
    (locks / "dead-here").write_text(f"{__import__('socket').gethostname()} 999999999")
    assert sorted(sweep.clear_dead_claims(tmp_path)) == ["dead-here", "lost"]
    assert [p.name for p in locks.iterdir()] == ["fresh"]
