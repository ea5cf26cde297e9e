"""Benchmark grids: base model x method x rank x scaling x training-data fraction x seed, each
cell at a learning rate selected on a split of the training data.

A grid is data (a YAML file, see benchmarks/grids/). `expand` turns it into cells with stable ids;
`run_grid` runs every cell through the one training flow (`adaptune.train.run`) and records each
finished cell as one JSON file, written atomically:

    <out>/grid.json             the grid as run
    <out>/cells/<id>.json       a finished cell: status "ok" (with metrics) or "skipped" (why)
    <out>/failed/<id>.json      a cell that raised; retried on the next start
    <out>/work/<id>/            a cell in progress (its run folder; resumable checkpoints)
    <out>/locks/<id>            claimed by a worker right now
    <out>/stale/<id>.json       finished cells that an edited grid no longer has

A cell counts as done only when its `cells/<id>.json` exists, and that file appears in one rename
after the run has finished. So the runner can be killed at any moment: on restart it skips the
done cells and reruns (or resumes, with train.checkpoint_every) the rest; no cell is counted
twice or half.

Learning rates (`lrs`, per method `method_lrs`) are not an axis of the results but a search
inside each cell, on the selection split (`data.selection_examples`), never on dev. With
`halving: {rungs: R, eta: e}` the search is successive halving: every lr trains the first
1/e^(R-1) of its schedule (a paused run, checkpoint kept), the best 1/e by selection score
continue to 1/e^(R-2), and so on, to the whole run (with early stopping, if set). A continued run
is the same run resumed, so the lr that wins is trained exactly as if alone. Every lr's record is
kept (`cells/<cell>-lr<lr>-rung<k>.json`); the report takes, per cell, the best final-rung lr.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from adaptune.config import RunConfig, compose, merge_dicts, to_dict, upgrade_stored
from adaptune.errors import ConfigError, Interrupted, NotApplicable
from adaptune.methods import METHODS, RANKED_METHODS  # the one method registry
from adaptune.safe_io import write_json


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep and what is fixed. Every cell's config is `overrides`, then the
    model's `model_overrides`, then the method's `method_overrides`, then the cell's own axis
    values."""

    name: str
    task: str
    dataset: str = ""
    models: tuple[str, ...] = ("minilm-l6",)
    methods: tuple[str, ...] = ("lora",)
    ranks: tuple[int, ...] = (8,)
    fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    # method.scaling values ("alpha/r", "rslora") for the methods that have the option; empty:
    # no axis (the config's scaling).
    scalings: tuple[str, ...] = ()
    # Candidate learning rates, searched per cell on the selection split; empty: train.lr.
    lrs: tuple[float, ...] = ()
    # Per method, its own candidates instead of `lrs` (full fine-tuning wants lower ones).
    method_lrs: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # Per ranked method, its own ranks instead of `ranks` (e.g. VeRA's large ones, or AdaLoRA
    # at the rank whose trainable parameters equal a LoRA rank's).
    method_ranks: Mapping[str, Sequence[int]] = field(default_factory=dict)
    # Successive halving over the lr candidates: {"rungs": R, "eta": e}. Default: one rung,
    # every candidate trained to the end.
    halving: Mapping[str, int] = field(default_factory=dict)
    # RunConfig sections, e.g. {"train": {"epochs": 1}, "data": {"max_train_examples": 2000}}.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # Per base model, e.g. {"mpnet-base": {"method": {"targets": ["q", "k", "v", "o"]}}}: layer
    # names differ between architectures.
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Per method, e.g. {"full": {"train": {"lr": 5e-5}}}: full fine-tuning wants a lower lr.
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Lineage of models the zoo does not know (e.g. {"my-l4": "my-ladder", "my-l8":
    # "my-ladder"}): size laws are fitted only within one lineage (zoo models carry theirs).
    lineages: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"grid {self.name!r}"
        for axis in ("models", "methods", "ranks", "fractions", "seeds"):
            values = getattr(self, axis)
            if not values:
                raise ConfigError(f"{where}: {axis} is empty; give at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}: {axis} lists a value twice: {list(values)}")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"{where}: methods: {m!r} is not one of {', '.join(METHODS)}")
        for m in self.model_overrides:
            if m not in self.models:
                raise ConfigError(f"{where}: model_overrides: {m!r} is not in models "
                                  f"{list(self.models)}")
        for m in self.lineages:
            if m not in self.models:
                raise ConfigError(f"{where}: lineages: {m!r} is not in models "
                                  f"{list(self.models)}")
        for key in ("method_overrides", "method_lrs", "method_ranks"):
            for m in getattr(self, key):
                if m not in self.methods:
                    raise ConfigError(f"{where}: {key}: {m!r} is not in methods "
                                      f"{list(self.methods)}")
        for m, values in {"": self.lrs, **self.method_lrs}.items():
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0
                   for v in values) or len(set(values)) != len(values):
                raise ConfigError(f"{where}: {'method_lrs.' + m if m else 'lrs'}: expected "
                                  f"distinct positive learning rates, got {list(values)}")
        if (self.lrs or self.method_lrs) and not self.overrides.get("data", {}).get(
                "selection_examples"):
            raise ConfigError(f"{where}: lrs are selected on a split of the training data; "
                              "set overrides.data.selection_examples (selecting on dev would "
                              "report the selected set's own score)")
        unknown = sorted(set(self.halving) - {"rungs", "eta"})
        if unknown:
            raise ConfigError(f"{where}: halving: unknown key(s) {unknown}; expected rungs, eta")
        if self.rungs < 1 or self.eta < 2:
            raise ConfigError(f"{where}: halving: expected rungs >= 1 and eta >= 2, got "
                              f"{dict(self.halving)}")
        for m, values in {"": self.ranks, **self.method_ranks}.items():
            if not values or any(not isinstance(r, int) or isinstance(r, bool) or r < 1
                                 for r in values) or len(set(values)) != len(values):
                raise ConfigError(f"{where}: {'method_ranks.' + m if m else 'ranks'} must be "
                                  f"distinct positive integers, got {list(values)}")
            if m and m not in RANKED_METHODS:
                raise ConfigError(f"{where}: method_ranks: {m} has no rank")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"{where}: fractions must be in (0, 1], got {list(self.fractions)}")
        for section in ("model", "method", "data"):
            fixed = {"model": "name", "method": "name", "data": "task"}[section]
            if fixed in self.overrides.get(section, {}):
                raise ConfigError(f"{where}: overrides.{section}.{fixed} is an axis of the grid; "
                                  "set it with the grid's own key instead")


    @property
    def rungs(self) -> int:
        return int(self.halving.get("rungs", 1))

    @property
    def eta(self) -> int:
        return int(self.halving.get("eta", 2))

    def ranks_of(self, method: str) -> tuple[int, ...]:
        return tuple(int(r) for r in self.method_ranks.get(method, self.ranks))

    def lrs_of(self, method: str) -> tuple[float | None, ...]:
        """The lr candidates of a method (None: no search, the config's lr)."""
        values = self.method_lrs.get(method, self.lrs)
        return tuple(float(v) for v in values) if values else (None,)

    def scalings_of(self, method: str) -> tuple[str | None, ...]:
        return self.scalings if self.scalings and METHODS[method].has_scaling else (None,)

    def rung_fraction(self, rung: int) -> float:
        """The fraction of the schedule trained by rung `rung` (the last rung: all of it)."""
        return float(self.eta) ** (rung - (self.rungs - 1))


def load_grid(path: str | Path) -> Grid:
    """Read a grid YAML file; unknown keys and wrong types are errors naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of grid keys, got {type(data).__name__}")
    return grid_from_dict(data, where=str(path))


def grid_from_dict(data: Mapping[str, Any], where: str = "grid") -> Grid:
    known = {f.name: f for f in dataclasses.fields(Grid)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    for key in ("name", "task"):
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("models", "methods", "ranks", "fractions", "seeds", "scalings", "lrs"):
            value = value if isinstance(value, (list, tuple)) else [value]
            kind = {"models": str, "methods": str, "ranks": int, "fractions": float,
                    "seeds": int, "scalings": str, "lrs": float}[key]
            try:
                value = tuple(kind(v) if not isinstance(v, bool) else _bad(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {key}: expected a list of {kind.__name__}, got "
                                  f"{data[key]!r}") from None
        elif key in ("overrides", "model_overrides", "method_overrides", "lineages",
                     "method_lrs", "method_ranks", "halving"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        elif not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        kwargs[key] = value
    grid = Grid(**kwargs)
    # Check the overrides now (strictly, as any config), not at the first cell an hour later.
    for model, method in itertools.product(grid.models, grid.methods):
        try:
            _cell_config(grid, model, method, grid.ranks[0], 1.0, grid.seeds[0],
                         grid.scalings_of(method)[-1], grid.lrs_of(method)[0])
        except ConfigError as exc:
            raise ConfigError(f"{where}: overrides for model {model!r}, method {method!r}: "
                              f"{exc}") from None
    return grid


def _bad(value: Any) -> Any:
    raise TypeError(value)


# ----------------------------------------------------------------------------------------------
# Cells.


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    rank: int | None  # None where the rank axis does not apply (bitfit, full, head)
    fraction: float
    seed: int
    config: RunConfig
    # What the grid sets for this cell (its overrides, the model's and the method's, the axis
    # values), as nested plain data: the cell's identity. Fields the grid leaves at their
    # defaults are not part of it, so a field added to RunConfig later (with its default) does
    # not orphan finished cells.
    settings: Mapping[str, Any] = field(default_factory=dict)
    # The lr search (None where the grid has no such axis): which scaling, which lr candidate,
    # which successive-halving rung. The rung is not a setting: every rung of one lr is one run.
    scaling: str | None = None
    lr: float | None = None
    rung: int | None = None

    @property
    def arm_id(self) -> str:
        """The run's identity, across rungs: its work folder."""
        model = "".join(c if c.isalnum() or c in "-_." else "_"
                        for c in (Path(self.model).name or self.model))
        rank = f"-r{self.rank}" if self.rank is not None else ""
        scaling = {None: "", "alpha/r": "-a_r", "rslora": "-rs"}[self.scaling]
        lr = f"-lr{self.lr:g}" if self.lr is not None else ""
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True)
                                .encode()).hexdigest()[:8]
        return f"{model}-{self.method}{rank}{scaling}-f{self.fraction:g}-s{self.seed}{lr}-{digest}"

    @property
    def id(self) -> str:
        """Readable and stable: the axis values, then a hash of what the grid sets, so that a
        changed override makes new cells instead of reusing stale results."""
        return self.arm_id + (f"-rung{self.rung}" if self.rung is not None else "")

    def axes(self) -> dict[str, Any]:
        out = {"model": self.model, "method": self.method, "rank": self.rank,
               "fraction": self.fraction, "seed": self.seed}
        # Only where the grid has them, so records of grids without them keep matching.
        out.update({k: v for k, v in (("scaling", self.scaling), ("lr", self.lr),
                                      ("rung", self.rung)) if v is not None})
        return out

    def group(self) -> tuple:
        """The cell an lr search belongs to: every axis but lr and rung."""
        return (self.model, self.method, self.rank, self.scaling, self.fraction, self.seed)

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether a finished record (of any adaptune version) is this cell: the same axis
        values, and every setting the grid asks for holds in the config it ran with."""
        if record.get("axes") != self.axes():
            return False
        stored = upgrade_stored(record.get("config", {}))
        return all(config_value(stored, path) == value for path, value in _leaves(self.settings))

    def default_drift(self, record: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Fields the grid does not set whose value differs between the config the record ran
        with and the config this version would run: {field: (then, now)}. A field the record's
        version did not have counts as at today's default."""
        stored, now = upgrade_stored(record.get("config", {})), to_dict(self.config)
        return {path: (config_value(stored, path, value), value) for path, value in _leaves(now)
                if path not in RUNNER_ONLY and config_value(stored, path, value) != value}


# Never part of a cell's result.
RUNNER_ONLY = {"output_dir", "overwrite", "train.num_threads", "train.tracking_dir",
               "train.run_name", "train.run_tags", "train.pause_at_fraction",
               "train.compile"}  # compiled and eager runs train alike (tested)
_MISSING = object()


def _leaves(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _leaves(value, path + ".")
        else:
            out.append((path, value))
    return out


def config_value(data: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    """data["a"]["b"] for path "a.b" (lists for tuples, as stored configs hold them)."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _cell_settings(grid: Grid, model: str, method: str, rank: int | None, fraction: float,
                   seed: int, scaling: str | None = None, lr: float | None = None
                   ) -> dict[str, Any]:
    axes: dict[str, Any] = {"model": {"name": model}, "method": {"name": method},
                            "data": {"task": grid.task, "train_fraction": fraction},
                            "train": {"seed": seed}}
    if rank is not None:
        axes["method"]["rank"] = rank
    if scaling is not None:
        axes["method"]["scaling"] = scaling
    if lr is not None:
        axes["train"]["lr"] = lr
    if grid.dataset:
        axes["data"]["dataset"] = grid.dataset
    settings = merge_dicts(merge_dicts(merge_dicts(
        json.loads(json.dumps(dict(grid.overrides))), grid.model_overrides.get(model, {})),
        grid.method_overrides.get(method, {})), axes)
    return json.loads(json.dumps(settings))  # tuples as lists, as stored configs have them


def _cell_config(grid: Grid, model: str, method: str, rank: int | None, fraction: float,
                 seed: int, scaling: str | None = None, lr: float | None = None) -> RunConfig:
    cfg = compose(_cell_settings(grid, model, method, rank, fraction, seed, scaling, lr))
    # Runner-only settings never enter a cell's identity.
    return cfg.replace(output_dir="", overwrite=False, train={"num_threads": 0})


def cell_for(grid: Grid, model: str, method: str, rank: int | None, fraction: float, *,
             seed: int, scaling: str | None = None, lr: float | None = None,
             rung: int | None = None) -> Cell:
    """One cell of `grid`'s settings, at any seed (the grid's own or a fresh one)."""
    return Cell(model, method, rank, fraction, seed,
                _cell_config(grid, model, method, rank, fraction, seed, scaling, lr),
                _cell_settings(grid, model, method, rank, fraction, seed, scaling, lr),
                scaling, lr, rung)


def expand(grid: Grid) -> tuple[list[Cell], list[str]]:
    """All cells of the grid in a fixed order, and the combinations that were skipped because
    an axis does not apply, each with the reason. The order is seed-major (seed, model, method,
    rank, fraction): a sweep stopped early has whole grids for its first seeds rather than
    every seed of its first models."""
    cells: list[Cell] = []
    skipped = [f"{method}: the rank axis does not apply (one cell per model, fraction and seed, "
               "not one per rank)" for method in grid.methods if method not in RANKED_METHODS]
    if grid.scalings:
        skipped += [f"{method}: the scaling axis does not apply" for method in grid.methods
                    if not METHODS[method].has_scaling]
    for seed, model, method in itertools.product(grid.seeds, grid.models, grid.methods):
        ranks: Sequence[int | None] = grid.ranks_of(method) if method in RANKED_METHODS \
            else [None]
        for rank, scaling, fraction in itertools.product(ranks, grid.scalings_of(method),
                                                         grid.fractions):
            # One lr search after another, rung by rung: a worker finds the next rung's lrs
            # ready right after the last of the previous rung has finished.
            cells += search_cells(grid, model, method, rank, fraction, seed, scaling)
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    return cells, skipped


# ----------------------------------------------------------------------------------------------
# Running.


def code_version() -> dict[str, Any]:
    """adaptune's version and, in a git checkout, the commit and whether the tree was dirty."""
    import adaptune

    version: dict[str, Any] = {"adaptune": adaptune.__version__, "commit": None, "dirty": None}
    root = Path(adaptune.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            version["commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--", "adaptune"],
                                    cwd=root, capture_output=True, text=True, timeout=10)
            version["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name() -> str:
    """What ran a record: the GPU's name, or the CPU's model, cores and the vector instructions
    torch's kernels use (AVX2, AVX512, ...), since float results differ in the last digits
    between kernels and bf16's speed depends on them."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from adaptune.precision import cpu_model

    return f"CPU ({cpu_model()}, {os.cpu_count()} cores, " \
           f"{torch.backends.cpu.get_cpu_capability()})"


def finished(out: Path, cells: Sequence[Cell]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The finished records in `out/cells` of these cells, by cell id: a record named by the
    cell's id, or one written under another id by an older version whose axis values and
    settings are this cell's (`Cell.matches`). Records of no cell are left out (stale)."""
    folder = Path(out) / "cells"
    by_id = {c.id: c for c in cells}
    by_axes = {json.dumps(c.axes(), sort_keys=True): c for c in cells}
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a valid cell record ({exc})") from None
        cell = by_id.get(path.stem) or by_axes.get(json.dumps(record.get("axes"),
                                                              sort_keys=True))
        if cell is not None and (path.stem == cell.id or cell.matches(record)) \
                and (cell.id not in found or path.stem == cell.id):
            found[cell.id] = (path, record)
    return found


def cell_run_config(cell: Cell, out: Path, num_threads: int = 0,
                    environment: Mapping[str, Any] | None = None,
                    pause_at_fraction: float = 0.0) -> RunConfig:
    """The run config of a cell inside a results folder: its work folder, threads, rung, and
    a tracker name (runner-only settings, never part of the cell's identity)."""
    work = out / "work" / cell.arm_id  # every rung of one lr continues the same run
    # A tracker sees every cell as a run of the grid, named by its id, tagged with its axes.
    tags = [f"grid={(environment or {}).get('grid', '')}"] + [
        f"{k}={v}" for k, v in cell.axes().items() if v is not None]
    return cell.config.replace(output_dir=str(work), train={
        "num_threads": num_threads, "pause_at_fraction": pause_at_fraction,
        "tracking_dir": str(out / "tracking"), "run_name": cell.arm_id, "run_tags": tags})


def run_cell(cell: Cell, out: Path, num_threads: int = 0,
             environment: Mapping[str, Any] | None = None,
             pause_at_fraction: float = 0.0) -> dict[str, Any]:
    """Train one cell (or one rung of it: `pause_at_fraction`) and record it; returns the
    record. A NotApplicable error (bitfit on a bias-free model, a rank larger than the layers)
    is recorded as skipped, not failed."""
    from adaptune.train import run

    out = Path(out)
    cfg = cell_run_config(cell, out, num_threads, environment, pause_at_fraction)
    started = time.perf_counter()
    try:
        result = run(cfg)
    except NotApplicable as exc:
        return record_cell(cell, out, environment, started, skipped=str(exc))
    return record_cell(cell, out, environment, started, metrics=result.metrics)


def run_pack(cells: Sequence[Cell], out: Path, num_threads: int = 0,
             environment: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train these cells as one pack (`adaptune.packing`) and record each one as `run_cell`
    would: one atomic record per cell, written when the pack has finished."""
    from adaptune.packing import run_packed

    out = Path(out)
    configs = [cell_run_config(c, out, num_threads, environment) for c in cells]
    started = time.perf_counter()
    results = run_packed(configs, log=lambda line: print(line, flush=True))
    return [record_cell(cell, out, environment, started, metrics=result.metrics)
            for cell, result in zip(cells, results)]


def record_cell(cell: Cell, out: Path, environment: Mapping[str, Any] | None, started: float,
                *, metrics: Mapping[str, Any] | None = None, skipped: str = "") -> dict[str, Any]:
    """Write a cell's record (the moment it counts as done) from its run's metrics, or as
    skipped with the reason; remove its work folder unless the run paused (a rung)."""
    record: dict[str, Any] = {"id": cell.id, "axes": cell.axes(), "config": to_dict(cell.config),
                              **(environment or {})}
    if metrics is None:
        record.update(status="skipped", reason=skipped)
    else:
        m = metrics
        record.update(
            status="ok", metric=m["main_metric"], value=m["dev"].get(m["main_metric"]),
            dev=m["dev"], trainable_params=m["trainable_params"], total_params=m["total_params"],
            backbone_params=m["backbone_params"],
            non_embedding_params=m["backbone_non_embedding_params"],
            train_examples=m["train_examples"], dev_examples=m["dev_examples"],
            tokens_seen=m["train_real_tokens"], padded_tokens=m["train_padded_tokens"],
            optimizer_steps=m["optimizer_steps"], train_time_s=m["train_time_s"],
            run_wall_time_s=m["wall_time_s"], times_cover=m.get("times_cover"),
            precision=m["precision"], attention=m.get("attention"),
            peak_memory_mb=m["peak_memory_mb"], resumed_from=m["resumed_from"],
            train_peak_memory_mb=m.get("train_peak_memory_mb"),
            train_memory_increase_mb=m.get("train_memory_increase_mb"),
            adapter_bytes=m.get("adapter_bytes"),
            dev_example_stats=m.get("dev_example_stats"), selected_on=m.get("selected_on"),
            selection=m.get("selection"), selection_examples=m.get("selection_examples"),
            best_step=m.get("best_step"), planned_steps=m.get("planned_steps"),
            stopped_early=m.get("stopped_early"), paused=bool(m.get("paused")),
            evaluations=[{k: v for k, v in e.items()} for e in m.get("evaluations", [])])
        if m.get("pack"):
            record["pack"] = m["pack"]  # trained in a pack: its time and memory are shared
    record["wall_time_s"] = time.perf_counter() - started
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out / "cells" / f"{cell.id}.json", record)  # the moment the cell counts as done
    if not record.get("paused"):
        shutil.rmtree(out / "work" / cell.arm_id, ignore_errors=True)
    (out / "failed" / f"{cell.id}.json").unlink(missing_ok=True)
    return record


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clear_dead_claims(out: Path) -> list[str]:
    """Remove the claims (locks/<cell id>, holding the claimant's pid) of processes that are no
    longer alive; a live process's claim is never removed. Returns the cells freed."""
    freed = []
    here = socket.gethostname()
    for lock in sorted((out / "locks").glob("*")) if (out / "locks").is_dir() else []:
        try:
            parts = lock.read_text().split()
            host, pid = (parts[0], int(parts[1])) if len(parts) == 2 else (here, int(parts[0]))
            age = time.time() - lock.stat().st_mtime
        except (OSError, ValueError, IndexError):
            host, pid, age = here, 0, 0.0
        dead = (not pid or not _pid_alive(pid)) if host == here else age > STALE_CLAIM_S
        if dead:
            lock.unlink(missing_ok=True)
            freed.append(lock.name)
    return freed


def _die_with_parent() -> None:
    """In a worker: receive SIGTERM when the sweep that started it dies (even by SIGKILL), so
    no orphan keeps training a cell that the next sweep would claim too (Linux prctl)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _claim(out: Path, cell_id: str) -> bool:
    """Claim a cell: create locks/<id> holding "<host> <pid>" (O_EXCL: one winner)."""
    locks = out / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(locks / cell_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
    os.close(fd)
    return True


# A claim from another machine (Ray workers share the results folder) cannot be checked by pid:
# its worker touches it every HEARTBEAT_S while the cell runs, and a claim untouched for
# STALE_CLAIM_S belongs to a lost node.
HEARTBEAT_S, STALE_CLAIM_S = 60.0, 600.0


@contextmanager
def _heartbeat(*locks: Path) -> Iterator[None]:
    import threading

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                for lock in locks:
                    os.utime(lock)
            except OSError:
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def selection_score(record: Mapping[str, Any], higher_is_better: bool) -> float | None:
    """A record's score on the selection split (its kept checkpoint's), signed so that larger
    is better; None for a skipped record. Never its dev score."""
    if record.get("status") != "ok" or not record.get("selection"):
        return None
    value = record["selection"][record["metric"]]
    return value if higher_is_better else -value


def survivors(records: Mapping[float | None, Mapping[str, Any]], eta: int,
              higher_is_better: bool) -> list[float | None]:
    """Successive halving's cut: of one cell's lrs at one rung ({lr: record}), the best
    ceil(n / eta) by selection score (ties: the smaller lr)."""
    scored = [(selection_score(r, higher_is_better), lr) for lr, r in records.items()]
    ranked = sorted([(s, lr) for s, lr in scored if s is not None],
                    key=lambda t: (-t[0], t[1] if t[1] is not None else 0.0))
    keep = math.ceil(len(scored) / eta)
    return [lr for _, lr in ranked[:keep]]


def next_step(cell: Cell, cells_by_key: Mapping[tuple, Cell], done: Mapping[str, Any],
              grid: Grid, higher_is_better: bool) -> str:
    """For a cell not done yet: "run", "wait" (a rung before it in its lr search is not
    complete) or "pruned" (its lr was cut at an earlier rung)."""
    alive = list(grid.lrs_of(cell.method))
    for rung in range(cell.rung or 0):  # replay the search's cuts up to this cell's rung
        ran = {lr: cells_by_key[(*cell.group(), lr, rung)] for lr in alive}
        if any(c.id not in done for c in ran.values()):
            return "wait" if cell.lr in alive else "pruned"
        alive = survivors({lr: done[c.id] for lr, c in ran.items()}, grid.eta, higher_is_better)
    return "run" if cell.lr in alive else "pruned"


def search_cells(grid: Grid, model: str, method: str, rank: int | None, fraction: float,
                 seed: int, scaling: str | None = None) -> list[Cell]:
    """Every cell of one lr search (all lrs, all rungs), at any seed: what a backtest re-runs
    to replicate the protocol, selection included, on fresh seeds."""
    searched = bool(grid.lrs or grid.method_lrs)
    return [cell_for(grid, model, method, rank, fraction, seed=seed, scaling=scaling, lr=lr,
                     rung=rung)
            for rung in (range(grid.rungs) if searched else [None])
            for lr in grid.lrs_of(method)]


def work_through(grid: Grid, out: Path, num_threads: int = 0, label: str = "",
                 cells: Sequence[Cell] | None = None, pack: int = 1) -> None:
    """Run every cell (of the grid, or the given ones) that is neither done nor claimed by
    another worker, each rung of an lr search once the previous rung of its cell is complete;
    lrs cut by successive halving are not run (their work folders are removed). `pack` > 1:
    up to that many compatible cells train together (`adaptune.packing`)."""
    from adaptune.tasks import task_class

    cells = list(cells) if cells is not None else expand(grid)[0]
    higher = task_class(grid.task).higher_is_better
    by_key = {(*c.group(), c.lr, c.rung): c for c in cells}
    environment = {"code_version": code_version(), "libraries": library_versions(),
                   "device": device_name(), "grid": grid.name}
    total = len(cells)
    done = {cid: record for cid, (_, record) in finished(out, cells).items()}
    clock = _Progress(cells, by_key, grid, higher, done)
    while True:
        # Records other workers wrote meanwhile (a cut needs every lr of the previous rung).
        for cell in cells:
            path = out / "cells" / f"{cell.id}.json"
            if cell.id not in done and path.exists():
                done[cell.id] = json.loads(path.read_text())
        # The first runnable cell from the top, every time: a search's next rung runs as soon
        # as it can, so a sweep stopped early has whole searches of its first cells.
        picked, waiting = None, False
        for index, cell in enumerate(cells, 1):
            if cell.id in done:
                continue
            step = next_step(cell, by_key, done, grid, higher)
            if step == "pruned":
                shutil.rmtree(out / "work" / cell.arm_id, ignore_errors=True)
                continue
            if step == "wait" or not _claim(out, cell.id):  # another worker has it
                waiting = True
                continue
            picked = index, cell
            break
        if picked is None:
            if not waiting:
                return
            clear_dead_claims(out)  # a worker killed meanwhile leaves its cell to us
            time.sleep(2.0)  # other workers are finishing what the rest depends on
            continue
        index, cell = picked
        where = f"{label}[{index}/{total}] {clock.line(done)}"
        partners = _claim_partners(cell, cells[index:], done, by_key, grid, higher, out,
                                   pack - 1) if pack > 1 else []
        if partners:
            _run_claimed_pack([cell, *partners], grid, out, num_threads, environment, where)
        else:
            _run_claimed(cell, grid, out, num_threads, environment, where)
        for ran in (cell, *partners):
            if not (out / "cells" / f"{ran.id}.json").exists():
                done[ran.id] = {"status": "failed"}  # in this sweep: a cut treats it as unscored


def _claim_partners(first: Cell, later: Sequence[Cell], done: Mapping[str, Any],
                    by_key: Mapping[tuple, Cell], grid: Grid, higher: bool, out: Path,
                    wanted: int) -> list[Cell]:
    """Up to `wanted` runnable cells after `first` that can share its pack (same base, task
    and tokenizer: `packing.pack_key`), claimed. Rungs of a successive-halving search pause
    and resume alone, so such grids are not packed."""
    from adaptune.packing import pack_key

    key = pack_key(first.config) if grid.rungs == 1 else None
    partners: list[Cell] = []
    for cell in later if key is not None else []:
        if len(partners) == wanted:
            break
        if cell.id in done or pack_key(cell.config) != key \
                or next_step(cell, by_key, done, grid, higher) != "run":
            continue
        if _claim(out, cell.id):
            partners.append(cell)
    return partners


def _run_claimed_pack(cells: list[Cell], grid: Grid, out: Path, num_threads: int,
                      environment: Mapping[str, Any], where: str) -> None:
    """A pack of claimed cells; if the pack fails, its cells run alone (each recorded as ok,
    skipped or failed, as usual)."""
    locks = [out / "locks" / c.id for c in cells]
    try:
        with _heartbeat(*locks):
            records = run_pack(cells, out, num_threads, environment)
    except Interrupted:
        for lock in locks:
            lock.unlink(missing_ok=True)
        raise
    except Exception as exc:  # e.g. a rank too large for one member: each cell decides alone
        print(f"{where} a pack of {len(cells)} cells failed ({type(exc).__name__}: {exc}); "
              "its cells run alone", flush=True)
        for cell in cells:
            if (out / "cells" / f"{cell.id}.json").exists():
                (out / "locks" / cell.id).unlink(missing_ok=True)
            else:
                _run_claimed(cell, grid, out, num_threads, environment, where)
        return
    for cell, record in zip(cells, records):
        (out / "locks" / cell.id).unlink(missing_ok=True)
        print(f"{where} {cell.id}: {_shown(record)} (in a pack of {len(cells)}, "
              f"{record.get('wall_time_s', 0.0):.1f} s)", flush=True)
    gc.collect()


def _shown(record: Mapping[str, Any]) -> str:
    shown = (f"{record['metric']} {record['value']:.4f}" if record.get("value") is not None
             else "paused" if record.get("paused") else f"skipped ({record.get('reason')})")
    if record.get("selection"):
        shown = f"selection {record['selection'][record['metric']]:.4f}, dev {shown}"
    return shown


class _Progress:
    """Cells done of the grid, counted as whole lr searches (a search's later rungs may be cut,
    so cells alone would mislead), and an ETA from the rate since this worker started (every
    worker's progress counts: they share the folder)."""

    def __init__(self, cells: Sequence[Cell], by_key: Mapping[tuple, Cell], grid: Grid,
                 higher: bool, done: Mapping[str, Any]) -> None:
        self.groups: dict[tuple, list[Cell]] = {}
        for cell in cells:
            self.groups.setdefault(cell.group(), []).append(cell)
        self.by_key, self.grid, self.higher = by_key, grid, higher
        self.started, self.at_start = time.monotonic(), self.complete(done)

    def complete(self, done: Mapping[str, Any]) -> int:
        return sum(all(c.id in done or next_step(c, self.by_key, done, self.grid, self.higher)
                       == "pruned" for c in group) for group in self.groups.values())

    def line(self, done: Mapping[str, Any]) -> str:
        complete, total = self.complete(done), len(self.groups)
        gained, elapsed = complete - self.at_start, time.monotonic() - self.started
        eta = ""
        if gained > 0 and complete < total:
            left = (total - complete) * elapsed / gained
            eta = f", ETA {left / 3600:.1f} h" if left >= 3600 else f", ETA {left / 60:.0f} min"
        return f"({complete}/{total} cells complete{eta})"


def _run_claimed(cell: Cell, grid: Grid, out: Path, num_threads: int,
             environment: Mapping[str, Any], where: str) -> None:
    pause = grid.rung_fraction(cell.rung) if cell.rung is not None else 1.0
    try:
        with _heartbeat(out / "locks" / cell.id):
            record = run_cell(cell, out, num_threads, environment,
                              pause_at_fraction=0.0 if pause >= 1 else pause)
    except Interrupted:  # SIGTERM/SIGINT: stop the sweep, the cell is not a failure
        raise
    except Exception as exc:  # one bad cell must not stop the sweep
        write_json(out / "failed" / f"{cell.id}.json",
                   {"id": cell.id, "axes": cell.axes(), "error": f"{type(exc).__name__}: "
                    f"{exc}", "traceback": traceback.format_exc(), **environment})
        print(f"{where} {cell.id}: FAILED ({type(exc).__name__}: {exc})", flush=True)
    else:
        print(f"{where} {cell.id}: {_shown(record)} ({record.get('wall_time_s', 0.0):.1f} s)",
              flush=True)
    finally:
        (out / "locks" / cell.id).unlink(missing_ok=True)
        gc.collect()


@dataclass
class SweepSummary:
    total: int
    done: int
    skipped_axes: list[str]
    failed: list[str]
    pruned: int = 0  # lr candidates cut by successive halving (not run, not counted in total)

    def __str__(self) -> str:
        lines = [f"{self.done} of {self.total} cells done"
                 + (f" ({self.pruned} lr runs cut by successive halving)" if self.pruned
                    else "")]
        lines += [f"not applicable: {s}" for s in self.skipped_axes]
        lines += [f"failed (see failed/<id>.json; retried on the next start): {f}"
                  for f in self.failed]
        return "\n".join(lines)


def run_grid(grid: Grid, out: str | Path, workers: int = 1, launcher: str = "local",
             address: str | None = None, pack: int = 1) -> SweepSummary:
    """Run (or finish) a grid into the folder `out`. With several workers each is a separate
    process that claims cells one at a time; with several GPUs each worker gets one, on a CPU
    they split the cores. `launcher="ray"` runs the workers as Ray tasks instead, on a local
    Ray or the cluster at `address` (the results folder must be on a filesystem they share).
    `pack` > 1: each worker trains up to that many compatible cells at once, on one copy of
    the base (`adaptune.packing`); each cell is still recorded on its own."""
    if pack < 1:
        raise ConfigError(f"sweep --pack: expected an integer >= 1, got {pack}")
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid_file = out / "grid.json"
    as_data = dataclasses.asdict(grid)
    if grid_file.exists():
        previous = json.loads(grid_file.read_text())
        if previous.get("name") != grid.name or previous.get("task") != grid.task:
            raise ConfigError(f"{out} holds the results of grid {previous.get('name')!r} "
                              f"({previous.get('task')}); use another folder for {grid.name!r}")
    write_json(grid_file, as_data)
    # Claims left by dead processes are void; a live process's claim (a worker of another
    # sweep still running) is kept, so no cell is ever trained by two processes at once.
    clear_dead_claims(out)
    cells, skipped = expand(grid)
    # An edited grid may no longer have some cells: their failures would only confuse the
    # report, and their finished records move aside to stale/ (kept, in case of a revert).
    ids = {c.id for c in cells}
    for path in (out / "failed").glob("*.json") if (out / "failed").is_dir() else []:
        if path.stem not in ids:
            path.unlink()
    found = finished(out, cells)
    kept = {path for path, _ in found.values()}
    for path in (out / "cells").glob("*.json") if (out / "cells").is_dir() else []:
        if path not in kept:
            (out / "stale").mkdir(exist_ok=True)
            os.replace(path, out / "stale" / path.name)
    states = cell_states(grid, cells, out, found)
    todo = sum(state == "pending" for state in states.values())
    pruned = sum(state == "pruned" for state in states.values())
    print(f"grid {grid.name}: {len(cells)} cells, {len(found)} already done, "
          + (f"{pruned} cut by successive halving, " if pruned else "")
          + f"{todo} to run" + (" (at most: a search's later rungs are cut as it goes)"
                                if grid.rungs > 1 and todo else "")
          + f", {workers} worker(s)", flush=True)
    if launcher == "ray":
        _run_on_ray(out, workers, address, pack)
    elif workers <= 1:
        work_through(grid, out, pack=pack)
    else:
        gpus = torch.cuda.device_count()
        threads = 1 if gpus else max(1, (os.cpu_count() or 1) // workers)
        procs = []
        for k in range(workers):
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
            procs.append(subprocess.Popen(
                worker_command("--worker", str(out), "--threads", str(threads),
                               "--label", f"w{k} ", "--pack", str(pack)), env=env,
                preexec_fn=_die_with_parent))
        try:
            for proc in procs:
                proc.wait()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    failed = sorted(p.stem for p in (out / "failed").glob("*.json")) \
        if (out / "failed").is_dir() else []
    states = cell_states(grid, cells, out)
    pruned = sum(state == "pruned" for state in states.values())
    return SweepSummary(len(cells) - pruned, len(finished(out, cells)), skipped, failed, pruned)


def cell_states(grid: Grid, cells: Sequence[Cell], out: Path,
                found: Mapping[str, tuple[Path, dict[str, Any]]] | None = None
                ) -> dict[str, str]:
    """Each cell's state: "done", "pruned" (an lr cut by successive halving), "pending".
    `found`: the `finished(out, cells)` the caller has already read."""
    from adaptune.tasks import task_class

    higher = task_class(grid.task).higher_is_better
    by_key = {(*c.group(), c.lr, c.rung): c for c in cells}
    found = found if found is not None else finished(out, cells)
    done = {cid: record for cid, (_, record) in found.items()}
    return {c.id: "done" if c.id in done else
            "pruned" if next_step(c, by_key, done, grid, higher) == "pruned" else "pending"
            for c in cells}


def _run_on_ray(out: Path, workers: int, address: str | None, pack: int = 1) -> None:
    """Each worker a Ray task with its resources (a GPU where the cluster has them, else CPU
    cores), claiming cells from the shared folder like a local worker: the cell records stay
    the source of truth, so a rerun after a lost node finishes what is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError("sweep --launcher ray needs Ray: pip install 'adaptune[ray]'") \
            from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=True)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        threads = 1 if gpus else max(1, int(resources.get("CPU", 1)) // workers)
        task = ray.remote(_ray_worker).options(num_cpus=threads, num_gpus=1 if gpus else 0)
        ray.get([task.remote(str(out), threads, f"ray{k} ", pack) for k in range(workers)])
    finally:
        if started_here:
            ray.shutdown()


def _ray_worker(out: str, threads: int, label: str, pack: int = 1) -> None:
    grid = grid_from_dict(json.loads((Path(out) / "grid.json").read_text()), where=out)
    work_through(grid, Path(out), threads, label, pack=pack)


def worker_command(*args: str) -> list[str]:
    """The command of a sweep worker process. It imports this very adaptune: `python -m` would
    put the working directory first on sys.path, so a sweep started with another version's code
    (a git worktree of the grid's commit) from a checkout would train its cells with the
    checkout's code, and record that commit."""
    root = str(Path(__file__).resolve().parent.parent)
    boot = (f"import sys; sys.path.insert(0, {root!r}); "
            "from adaptune.sweep import _worker_main; _worker_main(sys.argv[1:])")
    return [sys.executable, "-c", boot, *args]


def _worker_main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--label", default="")
    parser.add_argument("--pack", type=int, default=1)
    args = parser.parse_args(argv)
    out = Path(args.worker)
    grid = grid_from_dict(json.loads((out / "grid.json").read_text()), where=str(out))
    try:
        work_through(grid, out, args.threads, args.label, pack=args.pack)
    except Interrupted as exc:
        print(f"{args.label}stopped: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
