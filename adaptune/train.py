"""The one training flow: `run(config)`.

Recipes, the Python API, domain adaptation and the benchmark runners all call this function.
`run` reads top to bottom, one concern per step:

  1. `check_output_dir`, `prepare`: everything that can be checked before training (output
     folder, config, model, data, targets), the data read and tokenized
  2. `setup`: the task model, its precision, the accelerator, the method's adapter, AdamW with
     warm-up then linear decay, length-grouped batches
  3. `ckpt.restore_latest`: resume from the newest complete checkpoint, if any
  4. `_train`: the loop around `train_step` (one batch: loss, backward, clipping, accumulation,
     bf16 autocast when chosen, the method's per-step hook), with periodic evaluation that keeps
     the best adapter, and checkpoints
  5. `_final_metrics`: metrics.json beside config.json and adapter/ in the output folder

The run is resolved once (`adaptune.spec.resolve`: model facts, task and method instances);
method- and task-specific behaviour sits behind the `Method` and `Task` interfaces, and the loop
below has no branch on either. The adapter folder is written by `adaptune.artifact`, the dev set
scored by `adaptune.inference`, both shared with prediction.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from adaptune import attention as attentions
from adaptune import checkpoint as ckpt
from adaptune import compiling
from adaptune import precision as precisions
from adaptune import tracking
from adaptune.artifact import ADAPTER_DIR, write_adapter
from adaptune.batching import LengthGroupedBatches
from adaptune.config import RunConfig, to_dict, upgrade_stored
from adaptune.errors import ConfigError, Interrupted, OutputDirError, TrainingDiverged
from adaptune.inference import evaluate
from adaptune.methods import count_params
from adaptune.modeling import (
    TaskModel,
    build_task_model,
    count_backbone_params,
    dropout_keys,
    load_tokenizer,
)
from adaptune.safe_io import recover_interrupted_swap, write_json
from adaptune.spec import ResolvedRun, resolve
from adaptune.tasks import Task


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]
    config: RunConfig

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / ADAPTER_DIR


@dataclass(frozen=True)
class Plan:
    """Every derived number of a run, computed once."""

    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    eval_every: int
    epochs: int


@dataclass
class Prepared:
    """A resolved run with its data read and tokenized: everything `run` builds before the
    model."""

    run: ResolvedRun
    tokenizer: Any
    labels: list[str]
    train_examples: list = field(default_factory=list)
    dev_examples: list = field(default_factory=list)
    train_features: list = field(default_factory=list)
    dev_features: list = field(default_factory=list)
    # The selection split (data.selection_examples, carved from train): what picks the kept
    # checkpoint and stops early when present. Empty: dev does (the flow's older behaviour).
    selection_examples: list = field(default_factory=list)
    selection_features: list = field(default_factory=list)

    @property
    def task(self) -> Task:
        return self.run.task

    def build_model(self) -> TaskModel:
        return build_task_model(self.run, self.labels, self.tokenizer.pad_token_id)

    def evaluate(self, model: nn.Module, device: torch.device | str | None = None, *,
                 with_stats: bool = False, split: str = "dev") -> Any:
        """Metrics on dev (or on the selection split), and, `with_stats`, the per-example
        statistics of the main metric."""
        examples, features = ((self.selection_examples, self.selection_features)
                              if split == "selection" else (self.dev_examples, self.dev_features))
        return evaluate(model, self.task, examples, features, self.labels, self.tokenizer,
                        self.run.config.train.eval_batch_size, device, with_stats=with_stats)


def prepare(config: RunConfig) -> Prepared:
    """Resolve the run, read and check the data, tokenize: everything that can fail on bad
    input fails here, before anything is written."""
    run = resolve(config)
    task, max_len, seed = run.task, config.model.max_length, config.train.seed
    tokenizer = load_tokenizer(run.model.path)
    train = task.load(config.data, "train", seed)
    dev = task.load(config.data, "dev", seed)
    selection = task.load(config.data, "selection", seed) if config.data.selection_examples \
        else []
    labels = task.label_space(train, dev)
    return Prepared(run, tokenizer, labels, train, dev,
                    task.encode(train, tokenizer, labels, max_len, "train"),
                    task.encode(dev, tokenizer, labels, max_len, "dev"), selection,
                    task.encode(selection, tokenizer, labels, max_len, "dev") if selection
                    else [])


def resolve_precision(requested: str, device: torch.device | str = "cpu",
                      non_embedding_params: int = 0) -> str:
    """The precision without a probe (evaluation only, packs): "auto" is the fallback rule of
    `adaptune.precision` (bf16 on a GPU for models of at least 50M non-embedding parameters,
    fp32 otherwise). Training runs measure instead (`adaptune.precision.choose`)."""
    from adaptune.precision import fallback

    return requested if requested != "auto" else fallback(torch.device(device).type,
                                                          non_embedding_params)


def _warn_if_emulated_bf16(precision: str) -> None:
    from adaptune.precision import native_bf16

    if precision == "bf16" and not torch.cuda.is_available() and not native_bf16("cpu"):
        warnings.warn("train.precision=bf16 on a CPU without native bf16 instructions is "
                      "emulated and much slower than fp32", stacklevel=3)


def make_plan(config: RunConfig, n_train: int, num_processes: int) -> Plan:
    t = config.train
    batches = math.ceil(math.ceil(n_train / t.batch_size) / num_processes)
    steps_per_epoch = max(1, batches // t.grad_accum)
    total = t.max_steps or max(1, round(steps_per_epoch * t.epochs))
    every = t.eval_every or (max(1, steps_per_epoch // t.evals_per_epoch) if t.evals_per_epoch
                             else steps_per_epoch)
    return Plan(batches, steps_per_epoch, total, int(t.warmup_ratio * total), every,
                math.ceil(total / steps_per_epoch))


# What a run writes into its folder; anything else there is the user's and is never touched.
RUN_FILES = ("config.json", "metrics.json", ADAPTER_DIR, ckpt.CHECKPOINTS, ".lock", "tracking")


def _ours(path: Path) -> bool:
    return path.name in RUN_FILES or path.name.startswith((".tmp-", ".old-"))


def check_output_dir(config: RunConfig) -> tuple[Path, str]:
    """(folder, what to do): "new" (empty or new, or holding only a failed run's leftovers),
    "resume" (this same run, with a checkpoint), "finished" (this same run, complete: it is not
    trained again) or "overwrite". A folder holding another run is refused unless `overwrite`
    is set; a folder of files that are not a run's is refused too (nothing of it is deleted,
    even with `overwrite`)."""
    out = config.resolved_output_dir
    _check_writable(out)
    if not out.exists():
        return out, "new"
    recover_interrupted_swap(out / ADAPTER_DIR)
    entries = list(out.iterdir())
    foreign = [p.name for p in entries if not _ours(p)]
    if config.overwrite:
        return out, "overwrite"
    if foreign and not (out / "config.json").exists():
        raise OutputDirError(f"output folder {out} is not empty and holds another run or other "
                             f"files ({', '.join(sorted(foreign)[:5])}); choose another "
                             "output_dir or set overwrite=true")
    results = [p for p in (out / ADAPTER_DIR, out / "metrics.json", out / ckpt.CHECKPOINTS)
               if p.exists()]
    saved = out / "config.json"
    same = False
    if saved.exists():
        try:
            same = _same_run(json.loads(saved.read_text()), to_dict(config))
        except (json.JSONDecodeError, UnicodeDecodeError):
            same = False
    if same and (out / "metrics.json").exists():
        return out, "finished"
    if same and ckpt.latest(out) is not None:
        return out, "resume"
    # This run's partial adapter without a checkpoint, or nothing trained yet (a run that
    # failed early): start afresh.
    if same or not results:
        return out, "new"
    raise OutputDirError(f"output folder {out} is not empty and holds another run (its "
                         "config.json differs from this one or is missing); choose another "
                         "output_dir or set overwrite=true to replace it")


def _clear_run_files(out: Path) -> None:
    """Remove what an earlier run left (never the user's own files)."""
    for path in out.iterdir() if out.exists() else []:
        if _ours(path) and path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def fingerprint(p: Prepared) -> str:
    """A hash of what a resumed run must see unchanged: the resolved config (without the
    settings a resume may change) and the tokenized training and dev data."""
    import hashlib

    digest = hashlib.sha256(json.dumps(_strip_resumable(to_dict(p.run.config)),
                                       sort_keys=True).encode())
    for features in (p.train_features, p.dev_features, p.selection_features):
        for f in features:
            digest.update(repr((f["input_ids"], f.get("labels"), f.get("start_positions"),
                                f.get("end_positions"))).encode())
    return digest.hexdigest()


def _launch_main_process() -> bool:
    """Process 0 under `accelerate launch` (or the only process), known before any Accelerator
    exists: the folder checks and lock come first."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Only one process writes a run folder: a second one fails at once, with the holder's
    pid. Under `accelerate launch` the main process holds it for all ranks. A folder this run
    created and left empty (it failed before writing anything) is removed again."""
    import fcntl

    if not _launch_main_process():
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    handle = open(lock, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise OutputDirError(f"output folder {out} is being written by another process "
                                 f"(pid {holder}); wait for it or choose another output_dir") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
    finally:
        handle.close()


def _check_writable(out: Path) -> None:
    """Fail now, not after an hour of training, if results cannot be written."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"output folder {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"output folder {out}: {existing} is not writable")


def _same_run(a: dict, b: dict) -> bool:
    return _strip_resumable(upgrade_stored(a)) == _strip_resumable(upgrade_stored(b))


# Resuming may change when to evaluate/log/checkpoint and how fast, never what is trained; and
# where the folder is: a results folder moved, cloned elsewhere or named by a relative path
# holds the same runs (the folder a config.json sits in is the run's place).
RESUMABLE = {"output_dir", "overwrite", "log_every", "checkpoint_every", "num_threads", "compile",
             "pause_at_fraction", "report_to", "tracking_dir", "run_name", "run_tags"}


def _strip_resumable(d: dict) -> dict:
    return {k: (_strip_resumable(v) if isinstance(v, dict) else v) for k, v in d.items()
            if k not in RESUMABLE}


# ----------------------------------------------------------------------------------------------
# The flow.


@dataclass
class Trainer:
    """The objects one run trains with, built by `setup`."""

    accelerator: Any
    model: nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: LengthGroupedBatches
    plan: Plan
    labelled_per_batch: float  # labelled positions in an average full batch (loss weighting)
    precision: str
    params: dict[str, int]  # trainable, total, backbone, backbone non-embedding
    # The kept checkpoint's trainable weights (runs with a selection split): dev is scored on
    # them once, when the run has finished.
    best_weights: dict[str, torch.Tensor] | None = None
    memory: Any = None  # MemoryPeak of the training loop
    precision_record: dict[str, Any] = field(default_factory=dict)  # how it was chosen
    compile_record: dict[str, Any] = field(default_factory=dict)  # whether and why compiled
    attention_record: dict[str, Any] = field(default_factory=dict)  # which kernel and why


def run(config: RunConfig, *, prepared: Prepared | None = None) -> RunResult:
    """Train one run and write its output folder; resumes from the newest checkpoint there,
    and returns a finished run's results without training it again."""
    out, action = check_output_dir(config)
    if action == "finished":
        metrics = json.loads((out / "metrics.json").read_text())
        if _launch_main_process():
            print(f"{out}: this run has already finished; its results are kept (set "
                  "overwrite=true to train it again)")
        return RunResult(out, metrics, config)
    p = prepared or prepare(config)  # bad input fails here, before the folder is touched
    with folder_lock(out):
        return _run_in_folder(config, p, out, action)


def _run_in_folder(config: RunConfig, p: Prepared, out: Path, action: str) -> RunResult:
    tr = setup(p)
    main = tr.accelerator.is_main_process
    if action in ("new", "overwrite") and main:
        _clear_run_files(out)  # another run's files, or a failed run's leftovers
    tr.accelerator.wait_for_everyone()
    if main:
        write_json(out / "config.json", to_dict(config))
    tracking.start(tr.accelerator, config)  # after the folder is cleared: it writes there
    expected = fingerprint(p)
    state = ckpt.TrainState(fingerprint=expected)
    resumed_from = ckpt.restore_latest(out, tr.accelerator, tr.model, tr.optimizer,
                                       tr.scheduler, state, p.run.method)
    if resumed_from:
        tr.best_weights = ckpt.restore_best_weights(Path(resumed_from))
    if resumed_from and state.fingerprint not in ("", expected):
        raise OutputDirError(
            f"{out}: the training or dev data (or their tokenization) changed since the "
            f"checkpoint {resumed_from}; resuming would mix two data sets. Set overwrite=true "
            "to start over, or restore the data")
    with MemoryPeak() as memory:
        wall = _train(p, tr, out, state)
    tr.memory = memory
    if state.step < tr.plan.total_steps and not state.stopped_early:
        # Paused (train.pause_at_fraction): the checkpoint stays, no metrics.json, so the same
        # run continues from here when asked for more. Dev is not scored.
        ckpt.save(out, tr.accelerator, tr.model, tr.optimizer, tr.scheduler, state,
                  p.run.method, tr.best_weights)
        tracking.close(tr.accelerator)
        return RunResult(out, {**_final_metrics(p, tr, state, wall, resumed_from),
                               "paused": True}, config)
    if p.selection_features:
        _score_kept_checkpoint_on_dev(p, tr, state)
    metrics = _final_metrics(p, tr, state, wall, resumed_from)
    tracking.finish(tr.accelerator, config, metrics)
    # What a user stores and ships per task: the adapter's weight files.
    metrics["adapter_bytes"] = sum(f.stat().st_size for f in (out / ADAPTER_DIR).glob(
        "*.safetensors")) if main else None
    if main:
        try:
            write_json(out / "metrics.json", metrics)
        except OSError as exc:  # disk full: keep the checkpoint, so a rerun only re-evaluates
            raise OutputDirError(f"could not write {out / 'metrics.json'}: "
                                 f"{exc.strerror or exc}; the best adapter is in "
                                 f"{out / ADAPTER_DIR}, and a rerun resumes from the last "
                                 "checkpoint, if any") from None
        ckpt.remove_all(out)  # the run is complete: resumable checkpoints are no longer needed
    tr.accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it destroys the process group (accelerate >= 0.34), and a
    # launched script may call run() again (domain adaptation does). The entry points tear the
    # group down once, at exit (recipe.release_process_group).
    return RunResult(out, metrics, config)


def _score_kept_checkpoint_on_dev(p: Prepared, tr: Trainer, state: "ckpt.TrainState") -> None:
    """Dev scores of the checkpoint the selection split kept: the only time dev is read in a
    run with a selection split, after every decision of the run is made."""
    accelerator = tr.accelerator
    unwrapped = accelerator.unwrap_model(tr.model)
    if tr.best_weights is not None:
        own = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in tr.best_weights.items():
                own[name].copy_(tensor.to(own[name].device))
    if accelerator.is_main_process:
        with accelerator.autocast():
            state.best_dev, state.best_example_stats = p.evaluate(
                unwrapped, accelerator.device, with_stats=True)
    accelerator.wait_for_everyone()


def setup(p: Prepared) -> Trainer:
    """Model, precision, accelerator, the method's adapter, optimizer, schedule and batches."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    t = p.run.config.train
    set_seed(t.seed)
    model = p.build_model()
    backbone_total, backbone_non_embedding = count_backbone_params(model.backbone)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Without a GPU, several launched processes train on the CPU with gloo (accelerate only does
    # so when told `cpu`).
    processes = PartialState(cpu=device == "cpu").num_processes
    # `accelerate launch` pins OMP_NUM_THREADS=1 for CPU runs; one process should still use
    # every core, several processes share them.
    torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // processes))
    plan = make_plan(p.run.config, len(p.train_features), processes)

    # The method makes the model trainable (and checks targets, rank, biases).
    model = p.run.method.apply(model, p.run.model, plan.total_steps)
    trainable, total = count_params(model)
    if trainable == 0:
        raise ConfigError(f"method.name={p.run.method.name} leaves nothing to train for the "
                          f"{p.task.name} task (its head has no parameters); use lora or full")

    optimizer = p.run.method.optimizer(model, t.lr, t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(plan))
    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in p.train_features],
                                   t.batch_size, t.seed, t.group_by_length)
    loader = torch.utils.data.DataLoader(
        p.train_features, batch_sampler=sampler,
        collate_fn=lambda feats: p.task.collate(feats, p.tokenizer.pad_token_id),
        # Its own generator: starting an iterator must not draw from the global RNG that drives
        # dropout, or a resumed run would see different dropout masks.
        generator=torch.Generator().manual_seed(t.seed))
    p.run.method.before_train(model, loader)

    # Precision and attention kernel: measured on this model and its batches when "auto" (see
    # adaptune.precision and adaptune.attention), then handed to accelerate and transformers.
    probes: list[precisions.Batches] = []

    def on_device() -> tuple[nn.Module, precisions.Batches]:
        """The model on the run's device (a 4/8-bit base already sits on its GPU, and
        bitsandbytes models refuse `.to`) and the probes' weighted batches, built once."""
        if not probes:
            probes.append(precisions.probe_batches(p.task, p.train_features, sampler,
                                                   p.tokenizer.pad_token_id, device))
        here = next(model.parameters()).device.type == device
        return (model if here else model.to(device)), probes[0]

    attention_options = attentions.options(
        p.run.config.model.attention, model, device=device, batch_size=t.batch_size,
        max_length=max(len(f["input_ids"]) for f in p.train_features))
    # Where this run would measure the kernel, the precision probe times both kernels in both
    # precisions: the two choices interact (bf16 may pay with one kernel only).
    kernels = (attentions.COMPARED if attentions.worth_measuring(
        p.run.config.model.attention, attention_options, plan.total_steps) else (None,))

    def probe() -> dict[str, Any]:
        return precisions.measure(*on_device(), device, kernels, attentions.set_kernel)

    shape = {"model": p.run.model.path, "method": p.run.method.name, "task": p.task.name,
             "batch_size": t.batch_size, "threads": torch.get_num_threads()}
    # Each decision's seconds go into its record: a measurement is paid once per machine and
    # model (then cached), before training, so train_time_s does not hold it.
    decided = time.perf_counter()
    precision, precision_record = precisions.choose(
        t.precision, device=device, non_embedding_params=backbone_non_embedding,
        probe=probe if processes == 1 else None,
        # (Single-batch measurements, before both kinds of batch were timed, are not reused.)
        key_parts={**shape, "probe": "padded and unpadded batches",
                   "kernels": [str(k) for k in kernels]})
    precision_record["seconds"] = time.perf_counter() - decided
    _warn_if_emulated_bf16(precision)

    def measure_kernels() -> dict[str, Any]:
        """The kernels in the chosen precision: from the precision probe where it timed them,
        else measured now."""
        joint = attentions.from_precision_probe(precision_record.get("probe") or {}, precision)
        if joint is not None:
            return {**joint, "from": "the precision probe"}
        model_here, batches = on_device()
        return attentions.measure(model_here, batches, device, bf16=precision == "bf16")

    # The attention kernel: asked for, or (auto) sdpa or eager, whichever measured faster here
    # in the chosen precision, where eager's memory is bounded (see adaptune.attention).
    decided = time.perf_counter()
    attention_record = attentions.apply(
        p.run.config.model.attention, model, attention_options, steps=plan.total_steps,
        device=device, key_parts={**shape, "precision": precision},
        measure_fn=measure_kernels if processes == 1 else None)
    attention_record["seconds"] = time.perf_counter() - decided
    # Compilation: asked for, or (auto) predicted to repay its cost over this run's steps.
    decided = time.perf_counter()
    compile_record = compiling.apply(
        t.compile, model, steps=plan.total_steps, device=device,
        key_parts={**shape, "precision": precision, "attention": attention_record["picked"]},
        measure_fn=lambda: compiling.measure(*_heaviest(*on_device()), device,
                                             bf16=precision == "bf16"))
    compile_record["seconds"] = time.perf_counter() - decided
    if t.compile == "on" and not compile_record.get("blocks"):
        warnings.warn(f"train.compile: found no repeated blocks in {p.run.model.name} to "
                      "compile; training without torch.compile", stacklevel=3)
    # Several runs in one process (tests, sweeps) may differ in precision: forget the previous
    # run's accelerator settings, keep the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              gradient_accumulation_steps=t.grad_accum, cpu=device == "cpu",
                              **tracking.accelerator_kwargs(p.run.config))
    # The schedule is not handed to accelerate: its wrapper steps a schedule once per process
    # per optimizer step (it assumes one written for the whole data set), which with 2
    # processes ran warm-up and decay twice as fast and left the last half of training at lr 0
    # (CoNLL dev F1 0.78 against 0.85 with 1 process). The plan counts optimizer steps.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    labelled_per_batch = t.batch_size * sum(map(_labelled, p.train_features)) / max(
        1, len(p.train_features))
    return Trainer(accelerator, model, optimizer, scheduler, loader, sampler, plan,
                   labelled_per_batch, precision,
                   {"trainable": trainable, "total": total, "backbone": backbone_total,
                    "backbone_non_embedding": backbone_non_embedding},
                   precision_record=precision_record, compile_record=compile_record,
                   attention_record=attention_record)


def _heaviest(model: nn.Module, batches: "precisions.Batches"
              ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model and the probe batch of the larger weight: compilation is timed on one batch
    shape (each new shape recompiles)."""
    return model, max(batches, key=lambda item: item[1])[0]


@contextmanager
def _stop_requests() -> Iterator[list[str]]:
    """SIGTERM (what clusters send before preemption) and SIGINT (Ctrl-C) during training set a
    flag that the loop checks after each optimizer step, instead of killing the process
    mid-write; the previous handlers come back afterwards."""
    import signal
    import threading

    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signals are delivered to the main thread only
        return

    def handler(signum, _frame):
        requested.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop(out: Path, tr: Trainer, p: Prepared, state: "ckpt.TrainState", started: float,
          signal_name: str) -> None:
    """Save a checkpoint (where the run makes them) and stop with one clear line."""
    t = p.run.config.train
    if t.checkpoint_every:
        state.elapsed = time.perf_counter() - started
        path = ckpt.save(out, tr.accelerator, tr.model, tr.optimizer, tr.scheduler, state,
                         p.run.method, tr.best_weights)
        raise Interrupted(f"{signal_name} at optimizer step {state.step}: checkpoint saved to "
                          f"{path}; run the same command again to resume from it")
    latest = ckpt.latest(out)
    raise Interrupted(f"{signal_name} at optimizer step {state.step}: no checkpoint saved "
                      "(train.checkpoint_every is 0); "
                      + (f"the last one is {latest}" if latest else "a rerun starts over"))


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` is set on any process (one small collective per step, with several)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def _train(p: Prepared, tr: Trainer, out: Path, state: "ckpt.TrainState") -> float:
    """The loop: from `state` (fresh or resumed) to the last step. Returns the wall time."""
    with _stop_requests() as stop:
        return _loop(p, tr, out, state, stop)


def _loop(p: Prepared, tr: Trainer, out: Path, state: "ckpt.TrainState",
          stop: list[str]) -> float:
    t, plan, accelerator, model = p.run.config.train, tr.plan, tr.accelerator, tr.model
    progress = _progress(plan.total_steps, accelerator, initial=state.step)
    started = time.perf_counter() - state.elapsed
    pause_at = math.ceil(t.pause_at_fraction * plan.total_steps) if t.pause_at_fraction \
        else plan.total_steps
    model.train()
    logged: list[float] = []  # losses since the last tracker log
    while state.step < pause_at and not state.stopped_early:
        tr.sampler.use_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(tr.loader, state.batch_in_epoch) \
            if state.batch_in_epoch else tr.loader
        for batch in epoch_loader:
            state.batch_in_epoch += 1
            state.real_tokens += int(batch["attention_mask"].sum())
            state.padded_tokens += batch["attention_mask"].numel()
            try:
                loss = train_step(p, tr, batch, state.step + 1)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; last good checkpoint: {ckpt.latest(out) or 'none'} "
                                       "(lower train.lr, or use train.precision=fp32)") from None
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            state.add_loss(loss.item())
            logged.append(loss.item())
            progress.update(1)
            if state.step % t.log_every == 0:
                progress.set_postfix(loss=f"{state.loss_sum / state.loss_count:.4f}",
                                     lr=f"{tr.scheduler.get_last_lr()[0]:.2e}")
                tracking.log(accelerator, p.run.config, {
                    "train/loss": sum(logged) / len(logged),
                    "train/lr": tr.scheduler.get_last_lr()[0],
                    "train/real_tokens_per_s": state.real_tokens / max(
                        1e-9, time.perf_counter() - started - state.overhead)}, state.step)
                logged.clear()
            if state.step % plan.eval_every == 0 or state.step in (pause_at, plan.total_steps):
                paused = time.perf_counter()
                metrics = _evaluate_and_keep_best(p, tr, out, state)
                tracking.log_scores(accelerator, p.run.config, metrics, state.step)
                state.overhead += time.perf_counter() - paused
                state.evals = [*state.evals, {"step": state.step,
                                              "train_loss": state.take_window_loss(),
                                              "lr": tr.scheduler.get_last_lr()[0], **metrics}]
                model.train()
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                paused = time.perf_counter()
                state.elapsed = paused - started
                ckpt.save(out, accelerator, model, tr.optimizer, tr.scheduler, state,
                          p.run.method, tr.best_weights)
                state.overhead += time.perf_counter() - paused
            if _any_rank(accelerator, bool(stop)):  # every rank stops at the same step
                progress.close()
                _stop(out, tr, p, state, started, stop[0] if stop else "a signal to a peer")
            if state.step >= pause_at or state.stopped_early:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    # Kept in the state: a paused run's checkpoint carries it, so the run that resumes counts
    # this part's time too (its overhead already holds this part's evaluations).
    state.elapsed = time.perf_counter() - started
    return state.elapsed


def train_step(p: Prepared, tr: Trainer, batch: dict[str, torch.Tensor],
               step: int) -> torch.Tensor:
    """One batch forward and backward, and at the end of an accumulation the optimizer step
    (`step` is its number, from 1): what the loop repeats, and what benchmarks/step_levers.py
    times. Returns the loss; raises TrainingDiverged before stepping on a non-finite one."""
    accelerator, model = tr.accelerator, tr.model
    with accelerator.accumulate(model):
        # The loss is a mean over the batch's labelled positions. Length-grouped batches hold
        # very different numbers of them (short sentences together, long ones together), so
        # scale by this batch's share: every labelled token then weighs the same, as in random
        # batches, instead of short sentences weighing more.
        loss = model(**batch).loss * (_labelled_in(batch) / tr.labelled_per_batch)
        if not torch.isfinite(loss.detach()):
            raise TrainingDiverged(f"loss is {loss.item()} at optimizer step {step}")
        accelerator.backward(loss)
        max_grad_norm = p.run.config.train.max_grad_norm
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        tr.optimizer.step()
        if accelerator.sync_gradients:
            # Method hook (AdaLoRA's budget) between step() and zero_grad().
            p.run.method.after_step(accelerator.unwrap_model(model), step)
            # Once per optimizer step, whatever the number of processes (see setup).
            tr.scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
    return loss


def _final_metrics(p: Prepared, tr: Trainer, state: "ckpt.TrainState", wall: float,
                   resumed_from: str | None) -> dict[str, Any]:
    metrics = final_metrics(p, state, wall, resumed_from, plan=tr.plan, params=tr.params,
                            precision=tr.precision, memory=tr.memory,
                            processes=tr.accelerator.num_processes)
    metrics["precision_choice"] = tr.precision_record
    metrics["compile_choice"] = tr.compile_record
    metrics["attention_choice"] = tr.attention_record
    model = tr.accelerator.unwrap_model(tr.model)
    metrics["attention"] = attentions.kernel(model)  # the kernel the run trained with
    config = getattr(getattr(model, "backbone", None), "config", None)
    # The backbone's dropout rates in use (model.dropout: the checkpoint's, or the run's).
    metrics["backbone_dropout"] = ({key: getattr(config, key) for key in dropout_keys(config)}
                                   if config is not None else None)
    return metrics


def final_metrics(p: Prepared, state: "ckpt.TrainState", wall: float, resumed_from: str | None,
                  *, plan: Plan, params: dict[str, int], precision: str, memory: Any,
                  processes: int) -> dict[str, Any]:
    """metrics.json of a finished run (also of each adapter of a pack: adaptune.packing)."""
    sign = 1 if p.task.higher_is_better else -1
    main, selecting = p.task.main_metric, bool(p.selection_features)
    # The kept checkpoint: the best evaluation on the selection split when there is one (its
    # dev scores were taken for reporting only), else on dev.
    best = max(state.evals, key=lambda e: sign * (e["selection"][main] if selecting else e[main]))
    return {
        "dev": dict(state.best_dev or {}) if selecting else
        {k: v for k, v in best.items() if k not in ("step", "train_loss", "lr")},
        "selected_on": "selection" if selecting else "dev",
        "selection": best.get("selection"),
        "selection_examples": len(p.selection_examples),
        "stopped_early": state.stopped_early,
        "planned_steps": plan.total_steps,
        "best_step": best["step"],
        "evaluations": state.evals,
        "main_metric": p.task.main_metric,
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "trainable_percent": 100.0 * params["trainable"] / params["total"],
        "backbone_params": params["backbone"],
        "backbone_non_embedding_params": params["backbone_non_embedding"],
        "train_examples": len(p.train_examples),
        "dev_examples": len(p.dev_examples),
        "optimizer_steps": state.step,
        "epochs": plan.epochs,
        "wall_time_s": wall,  # training, evaluations and checkpoints
        "train_time_s": wall - state.overhead,  # training steps only
        # Both times cover every part of a resumed run. Records without this mark were written
        # by code that counted a resumed run's last part only (report.train_time).
        "times_cover": "whole run",
        "train_real_tokens": state.real_tokens * processes,
        "train_padded_tokens": state.padded_tokens * processes,
        "real_tokens_per_s": state.real_tokens * processes / max(1e-9, wall - state.overhead),
        "peak_memory_mb": peak_memory_mb(),  # the process's, since it started
        # This run's training loop: its peak, and how far above the memory held before it.
        "train_peak_memory_mb": memory.peak_mb if memory else None,
        "train_memory_increase_mb": (memory.peak_mb - memory.baseline_mb) if memory else None,
        "precision": precision,
        "num_processes": processes,
        "resumed_from": resumed_from,
        "final_train_loss": state.loss_sum / max(1, state.loss_count),
        # Per dev example, the statistics of the best evaluation's main metric (their column
        # sums give it: Task.metric_from_stats); reports resample them for dev-set noise.
        "dev_example_stats": state.best_example_stats,
    }


def evaluate_untrained(config: RunConfig) -> dict[str, float]:
    """Dev metrics of the base model as it is, with no training (a freshly built head, if the
    task has one with parameters): the "before" of summarization and causal-LM perplexity."""
    from accelerate.utils import set_seed

    p = prepare(config)
    set_seed(config.train.seed)
    model = p.build_model()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    precision = resolve_precision(config.train.precision, device,
                                  count_backbone_params(model.backbone)[1])
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return p.evaluate(model, device)


def _evaluate_and_keep_best(p: Prepared, tr: Trainer, out: Path,
                            state: "ckpt.TrainState") -> dict[str, float]:
    """Score the dev set on the main process only (once, not once per process), save the
    adapter when the main metric improves, and share the scores with every process."""
    from accelerate.utils import broadcast_object_list

    accelerator = tr.accelerator
    split = "selection" if p.selection_features else "dev"
    metrics: dict[str, Any] = {}
    unwrapped = accelerator.unwrap_model(tr.model)
    if accelerator.is_main_process:
        with accelerator.autocast():
            scores, stats = p.evaluate(unwrapped, accelerator.device, with_stats=True,
                                       split=split)
        metrics = save_if_better(p, state, scores, stats, lambda: write_adapter(
            unwrapped, p.run, p.labels, out / ADAPTER_DIR))
        accelerator.print(f"step {state.step}: {split} " + ", ".join(
            f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    if accelerator.num_processes > 1:
        metrics = broadcast_object_list([metrics])[0]
    kept = track_best(p, state, metrics, lambda: {
        n: t.detach().to("cpu", copy=True) for n, t in unwrapped.named_parameters()
        if t.requires_grad})
    if kept is not None:
        tr.best_weights = kept
    accelerator.wait_for_everyone()
    return metrics


def save_if_better(p: Prepared, state: "ckpt.TrainState", scores: dict[str, Any],
                   stats: Any, save_adapter: Any) -> dict[str, Any]:
    """After an evaluation (main process): write the adapter (`save_adapter()`) when the main
    metric improves on the kept checkpoint's; returns the evaluation's record."""
    split = "selection" if p.selection_features else "dev"
    if _improves(p.task, scores[p.task.main_metric], state.best):
        save_adapter()
        if split == "dev":
            state.best_example_stats = stats
    return {"selection": scores} if split == "selection" else scores


def track_best(p: Prepared, state: "ckpt.TrainState", metrics: dict[str, Any],
               trainable_weights: Any) -> dict[str, torch.Tensor] | None:
    """After an evaluation (every process): the best score so far, early stopping's count, and,
    in runs with a selection split, the new kept weights (`trainable_weights()`) when it
    improved (else None)."""
    selecting = bool(p.selection_features)
    value = (metrics["selection"] if selecting else metrics)[p.task.main_metric]
    if _improves(p.task, value, state.best):
        state.best, state.since_best = value, 0
        # Dev is scored for the kept checkpoint only, once the run has finished; no decision of
        # the run (kept checkpoint, early stop) or of a sweep (lr) reads it.
        return trainable_weights() if selecting else None
    state.since_best += 1
    patience = p.run.config.train.early_stopping_patience
    state.stopped_early = bool(patience) and state.since_best >= patience
    return None


def _improves(task: Task, value: float, best: float | None) -> bool:
    return best is None or (value > best if task.higher_is_better else value < best)


def _labelled(feature: dict[str, Any]) -> int:
    labels = feature.get("labels")
    return sum(label != -100 for label in labels) if isinstance(labels, list) else 1


def _labelled_in(batch: dict[str, torch.Tensor]) -> float:
    labels = batch.get("labels")
    if labels is not None and labels.dim() > 1:
        return float((labels != -100).sum())
    return float(batch["input_ids"].size(0))


def _warmup_linear(plan: Plan):
    def factor(step: int) -> float:
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        remaining = plan.total_steps - plan.warmup_steps
        return max(0.0, (plan.total_steps - step) / max(1, remaining))

    return factor


def peak_memory_mb() -> float:
    """The process's peak memory so far: GPU memory allocated, else resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MemoryPeak:
    """The peak memory of one run, above what the process held when it started: on a GPU the
    allocator's peak (reset at the start); on a CPU the resident set, sampled every 20 ms by a
    thread (the process-wide ru_maxrss would carry an earlier, larger run of the same sweep
    worker). Not exact on a CPU (a peak shorter than 20 ms is missed; freed memory the
    allocator keeps counts), but comparable between runs of one machine."""

    def __init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread: Any = None
        self.baseline_mb = self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
            return peak_memory_mb()

    def __enter__(self) -> "MemoryPeak":
        import threading

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
            return self
        self.baseline_mb = self.peak_mb = self._rss_mb()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak_mb = max(self.peak_mb, self._rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())
        elif torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20


def _progress(total: int, accelerator: Any, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step",
                disable=not accelerator.is_local_main_process or
                os.environ.get("ADAPTUNE_PROGRESS", "1") == "0")
