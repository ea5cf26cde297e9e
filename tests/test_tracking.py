"""Experiment tracking through accelerate's trackers, read back from the files they write."""

from __future__ import annotations

import pytest

from adaptune import sweep
from adaptune.train import run
from conftest import tiny_config


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def test_tensorboard_gets_config_losses_evaluations_and_results(tiny_encoder, cls_files,
                                                                tmp_path):
    pytest.importorskip("tensorboard")
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run",
                             train={"report_to": "tensorboard", "max_steps": 6, "log_every": 2,
                                    "eval_every": 3}))
    logs = tmp_path / "run" / "tracking"
    scalars = _scalars(logs)
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6]
    assert [step for step, _ in scalars["dev/accuracy"]] == [3, 6]
    assert scalars["final/dev/accuracy"][0][1] == pytest.approx(
        result.metrics["dev"]["accuracy"])
    assert scalars["final/trainable_params"][0][1] == result.metrics["trainable_params"]
    # The resolved config is stored as hyperparameters (accelerate writes them as YAML too).
    hparams = list(logs.rglob("hparams.yml"))
    assert hparams and "method.rank: 8" in hparams[0].read_text()


def test_sweep_cells_are_runs_of_one_grid_tagged_with_their_axes(tiny_encoder, cls_files,
                                                                 tmp_path):
    pytest.importorskip("tensorboard")
    from test_sweep import _grid_dict

    data = _grid_dict(tiny_encoder, cls_files, methods=["lora"], ranks=[2, 4])
    data["overrides"]["train"]["report_to"] = "tensorboard"
    grid = sweep.grid_from_dict(data)
    out = tmp_path / "sweep"
    sweep.run_grid(grid, out)
    runs = sorted(p.name for p in (out / "tracking" / "adaptune").iterdir())
    assert len(runs) == 2 and all(r.startswith("tiny-bert") for r in runs)
    assert {c.arm_id for c in sweep.expand(grid)[0]} == set(runs)
    text = next((out / "tracking").rglob("hparams.yml")).read_text()
    assert "train.run_tags: grid=tiny,model=" in text and "rank=" in text


def test_mlflow_local_file_store(tiny_encoder, cls_files, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, no server
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run",
                             train={"report_to": "mlflow", "max_steps": 4, "log_every": 2,
                                    "run_name": "tiny-lora", "run_tags": ["grid=g", "rank=8"]}))
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "adaptune"]
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "tiny-lora"
    assert logged.data.tags["rank"] == "8" and logged.data.params["method.rank"] == "8"
    assert logged.data.metrics["final/dev/accuracy"] == pytest.approx(
        result.metrics["dev"]["accuracy"])
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "train/loss")] == [2, 4]
