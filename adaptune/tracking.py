"""Experiment tracking through accelerate's trackers (`train.report_to`).

accelerate owns the integrations (TensorBoard, Trackio, MLflow, W&B, Aim); this module only
decides what a run logs and where:

- at the start: the resolved config, flattened to `section.field` hyperparameters;
- every `train.log_every` optimizer steps: the mean training loss since the last log, the lr,
  real tokens per second;
- every evaluation: its scores, under `selection/` or `dev/`;
- at the end: the reported dev scores, trainable parameters, peak memory.

Files go to `train.tracking_dir` (default `<output_dir>/tracking`; a sweep uses one folder for
the whole grid, with each cell a run named by its id and tagged with its axis values). Nothing
here needs a network: W&B works with WANDB_MODE=offline, MLflow with a local file store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from adaptune.config import RunConfig, to_dict

PROJECT = "adaptune"


def tracking_dir(config: RunConfig) -> Path:
    t = config.train
    return Path(t.tracking_dir) if t.tracking_dir else config.resolved_output_dir / "tracking"


def accelerator_kwargs(config: RunConfig) -> dict[str, Any]:
    """What `Accelerator(...)` takes for the configured tracker."""
    if config.train.report_to == "none":
        return {}
    return {"log_with": [config.train.report_to], "project_dir": str(tracking_dir(config))}


def hyperparameters(config: RunConfig) -> dict[str, Any]:
    """The config as flat scalars (trackers take int, float, str, bool)."""
    flat: dict[str, Any] = {}

    def walk(data: Mapping[str, Any], prefix: str) -> None:
        for key, value in data.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (list, tuple)):
                flat[f"{prefix}{key}"] = ",".join(map(str, value))
            else:
                flat[f"{prefix}{key}"] = value
    walk(to_dict(config), "")
    return flat


def start(accelerator: Any, config: RunConfig) -> None:
    t = config.train
    if t.report_to == "none":
        return
    name = t.run_name or config.resolved_output_dir.name
    tags = dict(tag.split("=", 1) if "=" in tag else (tag, "") for tag in t.run_tags)
    init = {"tensorboard": {}, "wandb": {"name": name, "tags": list(t.run_tags)},
            "mlflow": {"run_name": name, "tags": tags,
                       "logging_dir": str(tracking_dir(config))},
            "trackio": {"name": name}, "aim": {}}
    # TensorBoard keeps one folder per run inside the project folder.
    project = f"{PROJECT}/{name}" if t.report_to == "tensorboard" else PROJECT
    accelerator.init_trackers(project, config=hyperparameters(config),
                              init_kwargs={t.report_to: init[t.report_to]})


def log(accelerator: Any, config: RunConfig, values: Mapping[str, Any], step: int) -> None:
    if config.train.report_to != "none":
        accelerator.log({k: float(v) for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)


def log_scores(accelerator: Any, config: RunConfig, scores: Mapping[str, Any], step: int) -> None:
    """An evaluation's scores: {"selection": {...}} or the dev scores themselves."""
    if "selection" in scores:
        log(accelerator, config, {f"selection/{k}": v for k, v in scores["selection"].items()},
            step)
    else:
        log(accelerator, config, {f"dev/{k}": v for k, v in scores.items()}, step)


def finish(accelerator: Any, config: RunConfig, metrics: Mapping[str, Any]) -> None:
    """The run's reported results, then the trackers closed (not accelerator.end_training():
    it would destroy the process group, see train.py)."""
    if config.train.report_to == "none":
        return
    final = {f"final/dev/{k}": v for k, v in (metrics.get("dev") or {}).items()}
    final.update({"final/trainable_params": metrics.get("trainable_params"),
                  "final/peak_memory_mb": metrics.get("train_peak_memory_mb"),
                  "final/train_time_s": metrics.get("train_time_s")})
    log(accelerator, config, final, int(metrics.get("optimizer_steps") or 0))
    close(accelerator)


def close(accelerator: Any) -> None:
    """Flush and close the trackers (a paused run's too: its continuation opens them again)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
