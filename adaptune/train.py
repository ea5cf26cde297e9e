"""The one training flow: `run(config)`.

Recipes, the Python API and the benchmark runners all call this function. Helpers come first;
`run` itself reads top to bottom:

  1. check everything that can be checked before any training (config, model, data, targets)
  2. build the task model and let the adapter method make it trainable
  3. train with accelerate: AdamW, warm-up then linear decay, clipping, accumulation, bf16
     autocast when chosen (see `resolve_precision`), length-grouped batches, periodic
     evaluation, resumable checkpoints
  4. keep the best adapter, write config.json, metrics.json and adapter/ into the output folder

Method- and task-specific behaviour sits behind the `Method` and `Task` interfaces; the loop
below has no branch on either.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune import checkpoint as ckpt
from adaptune import zoo
from adaptune.batching import LengthGroupedBatches, eval_batches
from adaptune.config import RunConfig, to_dict
from adaptune.errors import ConfigError, OutputDirError, TrainingDiverged
from adaptune.methods import Method, count_params, get_method, save_trained
from adaptune.modeling import (TaskModel, compile_blocks, count_backbone_params, family_of,
                               load_backbone)
from adaptune.safe_io import atomic_dir, sha256_of, write_json
from adaptune.tasks import Task, get_task

ADAPTER_DIR = "adapter"
META_FILE = "adaptune.json"


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
    """Everything `run` builds before training: what the API's predictor reuses too."""

    config: RunConfig
    task: Task
    method: Method
    model_path: str
    family: str
    tokenizer: Any
    labels: list[str]
    train_examples: list = field(default_factory=list)
    dev_examples: list = field(default_factory=list)
    train_features: list = field(default_factory=list)
    dev_features: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Building blocks shared with loading for prediction.


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:  # decoders: pad with eos, as their configs expect
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_family(model_path: str, name: str) -> str:
    if name in zoo.ZOO:
        return zoo.ZOO[name].family
    from transformers import AutoConfig

    return family_of(AutoConfig.from_pretrained(model_path))


def build_task_model(model_path: str, family: str, task: Task, labels: list[str],
                     pad_token_id: int | None, quantization: str = "none") -> TaskModel:
    backbone = load_backbone(model_path, family, lm_head=task.lm_head, quantization=quantization)
    if pad_token_id is not None and getattr(backbone.config, "pad_token_id", None) is None:
        backbone.config.pad_token_id = pad_token_id
    head = task.build_head(backbone.config.hidden_size, labels, family, backbone.config)
    if quantization != "none":  # the head trains in fp32 next to the quantized base
        head.to(next(backbone.parameters()).device)
    return TaskModel(backbone, head)


def default_targets(name: str, model: nn.Module) -> tuple[str, ...]:
    if name in zoo.ZOO:
        return zoo.ZOO[name].lora_targets
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    return tuple(MAP.get(getattr(model.config, "model_type", ""), ()))


BF16_MIN_PARAMS = 50_000_000  # non-embedding parameters from which bf16 autocast pays


def resolve_precision(requested: str, device: torch.device | str = "cpu",
                      non_embedding_params: int = 0) -> str:
    """"auto": bf16 autocast on a GPU that supports it for models of at least 50M non-embedding
    parameters; fp32 otherwise. Measured: on this project's AVX512-BF16 CPU, bf16 autocast made
    LoRA training of minilm-l6 *slower* (1,839 vs 2,672 real tokens/s, NER); on an H100 too
    (7,111 vs 14,531): matrices of width 384 are too small to repay the casts. bf16 stays
    available on request. Returns "bf16" or "fp32"."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16" if non_embedding_params >= BF16_MIN_PARAMS else "fp32"
    return "fp32"


def _warn_if_emulated_bf16(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warnings.warn("train.precision=bf16 on a CPU without native bf16 instructions is "
                      "emulated and much slower than fp32", stacklevel=3)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def prepare(config: RunConfig) -> Prepared:
    """Resolve the model, read and check the data, tokenize: everything that can fail on bad
    input fails here, before anything is written."""
    task = get_task(config.data.task)
    method = get_method(config.method.name)
    model_path = zoo.resolve(config.model.name) if config.model.name in zoo.ZOO else \
        _check_model_name(config.model.name)
    family = model_family(model_path, config.model.name)
    task.check(config, family)
    tokenizer = load_tokenizer(model_path)
    seed = config.train.seed
    train = task.load(config.data, "train", seed)
    dev = task.load(config.data, "dev", seed)
    labels = task.label_space(train, dev)
    max_len = config.model.max_length
    return Prepared(config, task, method, model_path, family, tokenizer, labels, train, dev,
                    task.encode(train, tokenizer, labels, max_len, "train", config),
                    task.encode(dev, tokenizer, labels, max_len, "dev", config))


def _check_model_name(name: str) -> str:
    """A name outside the zoo must be a local folder or look like a Hub id (owner/name or a
    bare name); otherwise say what the zoo has."""
    from adaptune.errors import ModelError

    if Path(name).exists() or ("/" in name and not name.startswith((".", "/"))) or \
            os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(name)
            return name
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name: cannot load {name!r} ({str(exc).splitlines()[0]}); "
                             f"zoo models: {', '.join(zoo.ZOO)}") from None
    raise ModelError(f"model.name: {name!r} is neither a zoo model, a local folder nor a "
                     f"reachable Hub id; zoo models: {', '.join(zoo.ZOO)}")


def make_plan(config: RunConfig, n_train: int, num_processes: int) -> Plan:
    t = config.train
    batches = math.ceil(math.ceil(n_train / t.batch_size) / num_processes)
    steps_per_epoch = max(1, batches // t.grad_accum)
    total = t.max_steps or max(1, round(steps_per_epoch * t.epochs))
    return Plan(batches, steps_per_epoch, total, int(t.warmup_ratio * total),
                t.eval_every or steps_per_epoch, math.ceil(total / steps_per_epoch))


def check_output_dir(config: RunConfig) -> Path:
    """The output folder must be new, empty, or hold this same run (then it is resumed or
    redone). Anything else is refused unless `overwrite` is set."""
    out = config.resolved_output_dir
    _check_writable(out)
    if not out.exists() or not any(out.iterdir()) or config.overwrite:
        return out
    saved = out / "config.json"
    if saved.exists():
        try:
            theirs = json.loads(saved.read_text())
        except json.JSONDecodeError:
            theirs = None
        mine = to_dict(config)
        if theirs is not None and _same_run(theirs, mine):
            return out
    raise OutputDirError(f"output folder {out} is not empty and holds another run "
                         f"(its config.json differs or is missing); choose another output_dir or "
                         "set overwrite=true")


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
    # Resuming may change when to evaluate/log/checkpoint, never what is trained.
    ignore = {"overwrite", "log_every", "checkpoint_every", "num_threads", "compile"}

    def strip(d: dict) -> dict:
        return {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items()
                if k not in ignore}

    return strip(a) == strip(b)


# ----------------------------------------------------------------------------------------------
# The flow.


def run(config: RunConfig, *, prepared: Prepared | None = None) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    out = check_output_dir(config)
    p = prepared or prepare(config)
    t = config.train
    set_seed(t.seed)

    # Model: backbone + head; its size decides the default precision.
    model = build_task_model(p.model_path, p.family, p.task, p.labels, p.tokenizer.pad_token_id,
                             config.model.quantization)
    backbone_total, backbone_non_embedding = count_backbone_params(model.backbone)
    precision = resolve_precision(t.precision, "cuda" if torch.cuda.is_available() else "cpu",
                                  backbone_non_embedding)
    _warn_if_emulated_bf16(precision)
    # Several runs in one process (tests, sweeps) may differ in precision: forget the previous
    # run's accelerator settings, keep the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              gradient_accumulation_steps=t.grad_accum,
                              # Without a GPU, several launched processes train on the CPU
                              # with gloo (accelerate only does so when told `cpu`).
                              cpu=not torch.cuda.is_available())
    # `accelerate launch` pins OMP_NUM_THREADS=1 for CPU runs; one process should still use
    # every core, several processes share them.
    torch.set_num_threads(t.num_threads or max(
        1, (os.cpu_count() or 1) // accelerator.state.num_processes))
    plan = make_plan(config, len(p.train_features), accelerator.num_processes)

    # The method makes the model trainable (and checks targets, rank, biases).
    targets = default_targets(config.model.name, model)
    model = p.method.apply(model, config.method, targets, plan.total_steps)
    trainable, total = count_params(model)
    if trainable == 0:
        raise ConfigError(f"method.name={p.method.name} leaves nothing to train for the "
                          f"{p.task.name} task (its head has no parameters); use lora or full")
    if t.compile and not compile_blocks(model):
        warnings.warn(f"train.compile: found no repeated blocks in {config.model.name} to "
                      "compile; training without torch.compile", stacklevel=2)

    # Derived once: labelled positions (tokens for NER and language modelling, one per example
    # for classification) in an average full batch; see the loss weighting in the loop.
    labelled_per_batch = t.batch_size * sum(map(_labelled, p.train_features)) / max(
        1, len(p.train_features))
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(plan))
    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in p.train_features],
                                   t.batch_size, t.seed, t.group_by_length)
    loader = torch.utils.data.DataLoader(
        p.train_features, batch_sampler=sampler,
        collate_fn=lambda feats: p.task.collate(feats, p.tokenizer.pad_token_id),
        # Its own generator: starting an iterator must not draw from the global RNG that drives
        # dropout, or a resumed run would see different dropout masks.
        generator=torch.Generator().manual_seed(t.seed))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_json(out / "config.json", to_dict(config))
    state = ckpt.TrainState()
    resumed_from = ckpt.restore_latest(out, accelerator, model, optimizer, scheduler, state)

    progress = _progress(plan.total_steps, accelerator, initial=state.step)
    started = time.perf_counter() - state.elapsed
    evals: list[dict[str, Any]] = list(state.evals)
    model.train()
    while state.step < plan.total_steps:
        sampler.use_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) \
            if state.batch_in_epoch else loader
        for batch in epoch_loader:
            state.batch_in_epoch += 1
            with accelerator.accumulate(model):
                state.real_tokens += int(batch["attention_mask"].sum())
                state.padded_tokens += batch["attention_mask"].numel()
                # The loss is a mean over the batch's labelled positions. Length-grouped batches
                # hold very different numbers of them (short sentences together, long ones
                # together), so scale by this batch's share: every labelled token then weighs
                # the same, as in random batches, instead of short sentences weighing more.
                loss = model(**batch).loss * (_labelled_in(batch) / labelled_per_batch)
                if not torch.isfinite(loss.detach()):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at optimizer step {state.step + 1}; last good "
                        f"checkpoint: {ckpt.latest(out) or 'none'} (lower train.lr, or use "
                        "train.precision=fp32)")
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    # Method hook (AdaLoRA's budget) between step() and zero_grad().
                    p.method.after_step(accelerator.unwrap_model(model), state.step + 1)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            state.loss_sum += loss.item()
            state.loss_count += 1
            state.window_loss_sum += loss.item()
            state.window_loss_count += 1
            progress.update(1)
            if state.step % t.log_every == 0:
                progress.set_postfix(loss=f"{state.loss_sum / state.loss_count:.4f}",
                                     lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if state.step % plan.eval_every == 0 or state.step == plan.total_steps:
                paused = time.perf_counter()
                metrics = _evaluate_and_keep_best(accelerator, model, p, out, state)
                state.overhead += time.perf_counter() - paused
                train_loss = state.window_loss_sum / max(1, state.window_loss_count)
                state.window_loss_sum, state.window_loss_count = 0.0, 0
                evals.append({"step": state.step, "train_loss": train_loss, **metrics})
                state.evals = evals
                model.train()
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                paused = time.perf_counter()
                state.elapsed = paused - started
                ckpt.save(out, accelerator, model, optimizer, scheduler, state)
                state.overhead += time.perf_counter() - paused
            if state.step >= plan.total_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    wall = time.perf_counter() - started

    sign = 1 if p.task.higher_is_better else -1
    best = max(evals, key=lambda e: sign * e[p.task.main_metric])
    metrics = {
        "dev": {k: v for k, v in best.items() if k not in ("step", "train_loss")},
        "best_step": best["step"],
        "evaluations": evals,
        "main_metric": p.task.main_metric,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "backbone_params": backbone_total,
        "backbone_non_embedding_params": backbone_non_embedding,
        "train_examples": len(p.train_examples),
        "dev_examples": len(p.dev_examples),
        "optimizer_steps": state.step,
        "epochs": plan.epochs,
        "wall_time_s": wall,  # training, evaluations and checkpoints
        "train_time_s": wall - state.overhead,  # training steps only
        "train_real_tokens": state.real_tokens * accelerator.num_processes,
        "train_padded_tokens": state.padded_tokens * accelerator.num_processes,
        "real_tokens_per_s": state.real_tokens * accelerator.num_processes
        / max(1e-9, wall - state.overhead),
        "peak_memory_mb": peak_memory_mb(),
        "precision": precision,
        "num_processes": accelerator.num_processes,
        "resumed_from": resumed_from,
        "final_train_loss": state.loss_sum / max(1, state.loss_count),
    }
    if accelerator.is_main_process:
        write_json(out / "metrics.json", metrics)
        ckpt.remove_all(out)  # the run is complete: resumable checkpoints are no longer needed
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, metrics, config)


def evaluate_untrained(config: RunConfig) -> dict[str, float]:
    """Dev metrics of the base model as it is, with no training (a freshly built head, if the
    task has one with parameters): the "before" of summarization and causal-LM perplexity."""
    from accelerate.utils import set_seed

    p = prepare(config)
    set_seed(config.train.seed)
    model = build_task_model(p.model_path, p.family, p.task, p.labels, p.tokenizer.pad_token_id,
                             config.model.quantization)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    precision = resolve_precision(config.train.precision, device,
                                  count_backbone_params(model.backbone)[1])
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return evaluate(model, p.task, p.dev_examples, p.dev_features, p.labels, p.tokenizer,
                        config, device)


def _evaluate_and_keep_best(accelerator: Any, model: nn.Module, p: Prepared, out: Path,
                            state: "ckpt.TrainState") -> dict[str, float]:
    """Score the dev set on the main process only (once, not once per process), save the
    adapter when the main metric improves, and share the scores with every process."""
    from accelerate.utils import broadcast_object_list

    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with accelerator.autocast():
            metrics = evaluate(unwrapped, p.task, p.dev_examples, p.dev_features, p.labels,
                               p.tokenizer, p.config, accelerator.device)
        if _improves(p.task, metrics[p.task.main_metric], state.best):
            save_adapter(unwrapped, p, out / ADAPTER_DIR)
        accelerator.print(f"step {state.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if accelerator.num_processes > 1:
        metrics = broadcast_object_list([metrics])[0]
    value = metrics[p.task.main_metric]
    if _improves(p.task, value, state.best):
        state.best = value
    accelerator.wait_for_everyone()
    return metrics


def _improves(task: Task, value: float, best: float | None) -> bool:
    return best is None or (value > best if task.higher_is_better else value < best)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, examples: list, features: list, labels: list[str],
             tokenizer: Any, config: RunConfig, device: torch.device | str = "cpu"
             ) -> dict[str, float]:
    model.eval()
    predictions: list[Any] = [None] * len(features)
    lengths = [len(f["input_ids"]) for f in features]
    for indices in eval_batches(lengths, config.train.eval_batch_size):
        batch = task.collate([features[i] for i in indices], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        for i, pred in zip(indices, task.predict(model, batch, config, tokenizer)):
            predictions[i] = pred
    return task.score(examples, features, predictions, labels)


def save_adapter(model: nn.Module, p: Prepared, folder: Path) -> None:
    """The trained state plus `adaptune.json`, which says how to rebuild the model around it."""
    try:
        _write_adapter(model, p, folder)
    except OSError as exc:
        raise OutputDirError(f"could not write the adapter to {folder}: {exc.strerror or exc}; "
                             "the previously saved adapter, if any, is unchanged") from None


def _write_adapter(model: nn.Module, p: Prepared, folder: Path) -> None:
    with atomic_dir(folder) as tmp:
        save_trained(model, p.method, tmp)
        weights = {f.name: sha256_of(f) for f in sorted(tmp.glob("*.safetensors"))}
        if not weights or any((tmp / name).stat().st_size < 64 for name in weights):
            # peft under DeepSpeed ZeRO-3 is known to write empty adapters (peft #286, #2892).
            raise RuntimeError(f"saving the adapter produced no weights in {folder}")
        write_json(tmp / META_FILE, {
            "model": p.config.model.name, "model_path": p.model_path, "family": p.family,
            "task": p.task.name, "labels": p.labels, "method": p.method.name,
            "max_length": p.config.model.max_length, "config": to_dict(p.config),
            "sha256": weights,
        })


def _labelled(feature: dict[str, Any]) -> int:
    labels = feature.get("labels")
    return sum(label != -100 for label in labels) if isinstance(labels, list) else 1


def _labelled_in(batch: dict[str, torch.Tensor]) -> float:
    labels = batch.get("labels")
    if labels is not None and labels.dim() > 1:
        return float((labels != -100).sum())
    return float(batch["input_ids"].size(0))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norms (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _warmup_linear(plan: Plan):
    def factor(step: int) -> float:
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        remaining = plan.total_steps - plan.warmup_steps
        return max(0.0, (plan.total_steps - step) / max(1, remaining))

    return factor


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _progress(total: int, accelerator: Any, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step",
                disable=not accelerator.is_local_main_process or
                os.environ.get("ADAPTUNE_PROGRESS", "1") == "0")
