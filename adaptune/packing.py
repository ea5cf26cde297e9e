"""Packed training: K LoRA adapters trained at once on one frozen base.

    from adaptune.packing import run_packed
    results = run_packed([config_a, config_b, config_c])  # one RunResult per config

A grid trains many adapters that share every frozen weight. A pack holds the base once and
trains its adapters ("members") together: each step takes every member's own next micro-batch,
concatenates them along the batch dimension (padded to the longest; members whose batches
differ much in length form separate groups of the step), runs the frozen layers once on each
group, and applies each member's low-rank update (with peft's LoRA modules of that member; see
`rows_by_adapter`) and head to its own rows only. Everything else stays per member, as in a
run of its own: initial weights (built by the same steps from its seed), data order, optimizer,
schedule, clipping, evaluations (packed as well), kept checkpoint, early stopping, and the
output folder, written as `adaptune.train.run` writes it (config.json, metrics.json, adapter/
that loads with plain peft). Members may differ in rank, alpha, scaling, dropout, targets, lr,
seed, data fraction and budget; a member that stops early leaves the pack.

How close a member is to its run alone: the same within fp32 rounding when the backbone's
own dropout is off, as it is by default for LoRA (model.dropout=auto; tested with K = 3 and
three ranks); each member's head draws its dropout masks from the member's own random stream,
as alone. The backbone's dropout (with model.dropout=checkpoint: 0.1 in most checkpoints) and
LoRA dropout draw one stream for the whole pack: with them on, a member is the same run in
distribution, not bit for bit.

What cannot be packed is refused before training, naming the setting: methods other than
plain LoRA (DoRA, AdaLoRA, ...), LoRA initialisations that need a data pass or move the base,
init_from / stack_on / LoRA+, gradient accumulation, pauses (successive-halving rungs), mid-run
checkpoints (a killed pack reruns its unfinished members), trackers, several processes, and
tasks whose prediction is not one forward pass (summarization, language modelling). A member
whose folder holds a resumable checkpoint resumes alone.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from adaptune import checkpoint as ckpt
from adaptune.artifact import ADAPTER_DIR, write_adapter
from adaptune.batching import LengthGroupedBatches, eval_batches
from adaptune.config import RunConfig, to_dict
from adaptune.errors import ConfigError, TrainingDiverged
from adaptune.methods import Lora, count_params, param_groups
from adaptune.modeling import TaskOutput, count_backbone_params
from adaptune.safe_io import write_json
from adaptune.train import (MemoryPeak, Plan, Prepared, RunResult, _clear_run_files,
                            _labelled, _labelled_in, _warmup_linear, check_output_dir,
                            final_metrics, folder_lock, make_plan, prepare, resolve_precision,
                            run, save_if_better, track_best)

BACKBONE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------------------------------
# What can share a pack.


def unpackable_reason(config: RunConfig) -> str:
    """Why this run cannot train in a pack ("" if it can), naming the setting."""
    from adaptune.tasks import task_class

    m, t = config.method, config.train
    reasons = [
        (m.name != "lora", f"method.name={m.name} (packs train plain LoRA adapters)"),
        (m.lora.init not in ("default", "gaussian"),
         f"method.lora.init={m.lora.init} (needs a data pass or moves the base weights)"),
        (bool(m.lora.init_from), "method.lora.init_from is set"),
        (bool(m.lora.stack_on), "method.lora.stack_on is set"),
        (bool(m.lora.loraplus_lr_ratio), "method.lora.loraplus_lr_ratio is set (LoRA+)"),
        (t.grad_accum != 1, f"train.grad_accum={t.grad_accum} (packs step every batch)"),
        (bool(t.pause_at_fraction), "train.pause_at_fraction is set (a rung of a search)"),
        (bool(t.checkpoint_every), "train.checkpoint_every is set (packs keep no checkpoints)"),
        (t.compile == "on", "train.compile=on (packs run eager; auto is fine)"),
        (t.report_to != "none", f"train.report_to={t.report_to} (no trackers in packs)"),
        (config.model.quantization != "none",
         f"model.quantization={config.model.quantization}"),
        (not task_class(config.data.task).packable,
         f"data.task={config.data.task} (its prediction is not one forward pass)"),
    ]
    return "; ".join(why for bad, why in reasons if bad)


def pack_key(config: RunConfig) -> tuple | None:
    """Runs with the same key can share a pack (one base, task, tokenizer, length and
    precision); None: this run cannot be packed."""
    if unpackable_reason(config):
        return None
    return (config.model.name, config.model.max_length, config.data.task,
            config.data.data_dir, config.train.precision, config.train.eval_batch_size)


def _prepare_all(configs: Sequence[RunConfig]) -> list[Prepared]:
    """Each member's prepared run; members with the same data, model and seed (the seed draws
    the training subset and the selection split) share one reading and tokenization."""
    import dataclasses
    import json

    from adaptune.spec import resolve

    cache: dict[str, Prepared] = {}
    out = []
    for cfg in configs:
        d = to_dict(cfg)
        key = json.dumps([d["data"], d["model"], cfg.train.seed], sort_keys=True)
        if key in cache:
            out.append(dataclasses.replace(cache[key], run=resolve(cfg)))
        else:
            cache[key] = prepare(cfg)
            out.append(cache[key])
    return out


def _check(configs: Sequence[RunConfig], prepared: Sequence[Prepared]) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("packed training runs in one process; launch it without "
                          "`accelerate launch` (or with one process)")
    first = prepared[0]
    for cfg, p in zip(configs, prepared):
        why = unpackable_reason(cfg)
        if why:
            raise ConfigError(f"{cfg.output_dir}: cannot train in a pack: {why}")
        if type(p.run.method) is not Lora:  # a subclass (DoRA) has other layers
            raise ConfigError(f"{cfg.output_dir}: cannot train in a pack: method "
                              f"{p.run.method.name} is not plain LoRA")
        for what, mine, theirs in (
                ("model", p.run.model.path, first.run.model.path),
                ("task", p.task.name, first.task.name),
                ("labels", p.labels, first.labels),
                ("model.max_length", cfg.model.max_length, configs[0].model.max_length),
                ("train.precision", cfg.train.precision, configs[0].train.precision),
                ("train.eval_batch_size", cfg.train.eval_batch_size,
                 configs[0].train.eval_batch_size)):
            if mine != theirs:
                raise ConfigError(f"{cfg.output_dir}: cannot share a pack with "
                                  f"{configs[0].output_dir}: {what} differs ({mine!r} vs "
                                  f"{theirs!r}); one pack, one base, task and tokenizer")


# ---------------------------------------------------------------------------------------------
# The members and the shared model.


@dataclass
class Member:
    """One adapter of a pack, with everything its run alone would have."""

    name: str  # its peft adapter name inside the pack
    config: RunConfig
    p: Prepared
    out: Path
    action: str  # check_output_dir's: "new" or "overwrite"
    plan: Plan
    rng: torch.Tensor  # its own random stream (head dropout), as alone after setup
    counts: dict[str, int] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    sampler: LengthGroupedBatches | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    labelled_per_batch: float = 1.0
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    batches: Iterator[list[int]] | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # by the run-alone parameter names
    finished: bool = False
    wall: float = 0.0

    def own(self, pack_name: str) -> bool:
        return f".{self.name}." in pack_name

    def alone_name(self, pack_name: str) -> str:
        """The parameter's name in this member's run alone (peft's adapter "default")."""
        return pack_name.replace(f".{self.name}.", ".default.")

    def next_batch(self) -> list[int]:
        """The indices of its next micro-batch, in the order of its run alone (epochs roll)."""
        while True:
            if self.batches is None:
                self.sampler.use_epoch(self.state.epoch)
                self.batches = iter(self.sampler)
            indices = next(self.batches, None)
            if indices is not None:
                self.state.batch_in_epoch += 1
                return indices
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.batches = None


@contextmanager
def own_random_stream(member: Member) -> Iterator[None]:
    """Draw from the member's own CPU random stream (what its run alone would draw next)."""
    outer = torch.get_rng_state()
    torch.set_rng_state(member.rng)
    try:
        yield
    finally:
        member.rng = torch.get_rng_state()
        torch.set_rng_state(outer)


def _build(members: list[Member]) -> nn.Module:
    """The pack: one base (the first member's freshly built task model), one peft adapter and
    head per member. Each member's initial weights come from the same steps as its run alone
    (seed, task model, method), so they equal that run's."""
    from accelerate.utils import set_seed
    from peft import get_peft_model

    model, backbone = None, (0, 0)
    for member in members:
        p, t = member.p, member.config.train
        set_seed(t.seed)
        raw = p.build_model()
        if model is None:  # as a run alone counts them: before the adapter is injected
            backbone = count_backbone_params(raw.backbone)
        alone = p.run.method.apply(raw, p.run.model, member.plan.total_steps)
        member.rng = torch.get_rng_state()
        trainable, total = count_params(alone)
        member.counts = {"trainable": trainable, "total": total, "backbone": backbone[0],
                         "backbone_non_embedding": backbone[1]}
        weights = {n: w.detach().clone() for n, w in alone.named_parameters() if w.requires_grad}
        config = alone.peft_config["default"]
        if model is None:
            model = get_peft_model(p.build_model(), config, adapter_name=member.name)
        else:
            model.add_adapter(member.name, config)
        del alone
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                own[name.replace(".default.", f".{member.name}.")].copy_(value)
    for name, param in model.named_parameters():
        param.requires_grad_(any(m.own(name) for m in members))
    return model


def _setup_member(member: Member, model: nn.Module) -> None:
    t, p = member.config.train, member.p
    named = [(n, w) for n, w in model.named_parameters() if member.own(n)]
    member.params = [w for _, w in named]
    member.optimizer = torch.optim.AdamW(param_groups(named, t.weight_decay), lr=t.lr)
    member.scheduler = torch.optim.lr_scheduler.LambdaLR(member.optimizer,
                                                         _warmup_linear(member.plan))
    member.sampler = LengthGroupedBatches([len(f["input_ids"]) for f in p.train_features],
                                          t.batch_size, t.seed, t.group_by_length)
    member.labelled_per_batch = t.batch_size * sum(map(_labelled, p.train_features)) / max(
        1, len(p.train_features))
    member.state = ckpt.TrainState()


# ---------------------------------------------------------------------------------------------
# One forward pass of the pack.


@contextmanager
def rows_by_adapter(model: nn.Module, spans: list[tuple[str, int, int]]) -> Iterator[None]:
    """Every LoRA layer adds adapter `name`'s update to rows start:end only, for each
    (name, start, end) of `spans`, with peft's own modules of that adapter (its A, B, dropout
    and scaling). peft's mixed-batch forward (`adapter_names`) does the same with index
    gathers and in-place scatters, refuses to run while training, and its scatters cost K
    full-size copies per layer in the backward pass of a K-adapter pack: with contiguous
    spans, slices and one concatenation do."""
    from peft.tuners.lora import LoraLayer

    sizes = [end - start for _, start, end in spans]

    def add_updates(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # split, not slicing: the backward pass of a split is one concatenation, that of K
        # slices K zero-filled copies of the whole input.
        rows = args[0].split(sizes)
        deltas = [module.lora_B[name](module.lora_A[name](module.lora_dropout[name](
            x.to(module.lora_A[name].weight.dtype)))) * module.scaling[name]
            if name in module.lora_A else  # this member does not target this layer
            output.new_zeros((x.size(0), *output.shape[1:]))
            for (name, _, _), x in zip(spans, rows)]
        return output + torch.cat(deltas).to(output.dtype)

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    handles = [m.register_forward_hook(add_updates) for m in layers]
    for layer in layers:  # the layer itself runs only its frozen base; the hook adds the rest
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, handle in zip(layers, handles):
            layer._disable_adapters = False
            handle.remove()


def _pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if tensor.size(1) == width:
        return tensor
    return nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)


def pack_forward(model: nn.Module, members: Sequence[Member], batches: Sequence[dict],
                 pad_token_id: int, *, training: bool) -> list[TaskOutput]:
    """The members' outputs on their own batches, with the frozen layers run once on all."""
    task_model = model.base_model.model
    width = max(b["input_ids"].size(1) for b in batches)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    inputs = {key: torch.cat([_pad_to(b[key], width, pads[key]) for b in batches])
              for key in BACKBONE_INPUTS if key in batches[0]}
    spans, start = [], 0
    for member, batch in zip(members, batches):
        spans.append((member.name, start, start + batch["input_ids"].size(0)))
        start = spans[-1][2]
    with rows_by_adapter(model, spans):
        out = task_model.backbone(**inputs)
    features = out.logits if task_model.head_uses_logits else out.last_hidden_state
    heads = task_model.task_head.modules_to_save
    outputs = []
    task = members[0].p.task
    for member, batch, rows in zip(members, batches, features.split(
            [b["input_ids"].size(0) for b in batches])):
        own = rows[:, :batch["input_ids"].size(1)]
        extra = {k: v for k, v in batch.items() if k not in BACKBONE_INPUTS and
                 (training or k not in task.target_keys)}
        if task_model.head_ties_embeddings:
            extra["embeddings"] = task_model.backbone.get_input_embeddings().weight
        with own_random_stream(member):
            outputs.append(heads[member.name](own, attention_mask=batch["attention_mask"],
                                              **extra))
    return outputs


# A pack pads every row to its longest: members whose batches differ in length by more than
# this share a step but not a forward pass (each group of similar lengths runs its own).
MIN_LENGTH_RATIO = 0.8


def length_groups(batches: Sequence[dict]) -> list[list[int]]:
    """Positions of the batches in groups of similar length (every member of a group at least
    MIN_LENGTH_RATIO of its longest), longest first. Members of one seed have the same batches,
    so they always share a group."""
    order = sorted(range(len(batches)), key=lambda i: -batches[i]["input_ids"].size(1))
    groups: list[list[int]] = []
    for i in order:
        if groups and batches[i]["input_ids"].size(1) >= MIN_LENGTH_RATIO * \
                batches[groups[-1][0]]["input_ids"].size(1):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _Given:
    """Stands in for a model in `Task.predict`: returns an output computed in the pack."""

    def __init__(self, output: TaskOutput) -> None:
        self.output = output

    def __call__(self, **_inputs: Any) -> TaskOutput:
        return self.output


@torch.no_grad()
def pack_evaluate(model: nn.Module, members: Sequence[Member], split: str, device: Any,
                  autocast: Any) -> list[tuple[dict[str, float], list]]:
    """Each member's metrics (and per-example statistics) on its dev or selection split, the
    members' evaluation batches run together."""
    model.eval()
    splits = [(m.p.selection_examples, m.p.selection_features) if split == "selection"
              else (m.p.dev_examples, m.p.dev_features) for m in members]
    bs = members[0].config.train.eval_batch_size
    orders = [eval_batches([len(f["input_ids"]) for f in feats], bs) for _, feats in splits]
    predictions: list[list[Any]] = [[None] * len(feats) for _, feats in splits]
    task, tokenizer = members[0].p.task, members[0].p.tokenizer
    for position in range(max(map(len, orders))):
        here = [k for k, order in enumerate(orders) if position < len(order)]
        batches = [{key: v.to(device) for key, v in task.collate(
            [splits[k][1][i] for i in orders[k][position]], tokenizer.pad_token_id).items()}
            for k in here]
        outputs: list[Any] = [None] * len(here)
        for group in length_groups(batches):
            with autocast():
                done = pack_forward(model, [members[here[g]] for g in group],
                                    [batches[g] for g in group], tokenizer.pad_token_id,
                                    training=False)
            for g, output in zip(group, done):
                outputs[g] = output
        for k, batch, output in zip(here, batches, outputs):
            for i, value in zip(orders[k][position], task.predict(_Given(output), batch,
                                                                   tokenizer)):
                predictions[k][i] = value
    model.train()
    results = []
    for member, (examples, features), preds in zip(members, splits, predictions):
        labels = member.p.labels
        results.append((task.score(examples, features, preds, labels),
                        task.example_stats(examples, features, preds, labels)))
    return results


# ---------------------------------------------------------------------------------------------
# Saving one member as its own run.


class MemberView:
    """One member seen as the model of its run alone, for `write_adapter`: peft saves only its
    adapter and head, under the names a run alone writes (peft's "default")."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = model, name

    def save_pretrained(self, folder: str, **kwargs: Any) -> None:
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="adaptune-pack-") as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[self.name], **kwargs)
            for item in (Path(tmp) / self.name).iterdir():  # peft's subfolder for a named one
                shutil.move(str(item), str(Path(folder) / item.name))


# ---------------------------------------------------------------------------------------------
# The loop.


def run_packed(configs: Sequence[RunConfig], *, log: Any = print) -> list[RunResult]:
    """Train these runs as one pack; returns their results in order. Finished runs are
    returned as they are, runs with a resumable checkpoint resume alone (`run`)."""
    results: dict[int, RunResult] = {}
    todo: list[tuple[int, Path, str]] = []
    for k, cfg in enumerate(configs):
        out, action = check_output_dir(cfg)
        if action in ("finished", "resume"):
            results[k] = run(cfg)
        else:
            todo.append((k, out, action))
    if not todo:
        return [results[k] for k in range(len(configs))]
    prepared = _prepare_all([configs[k] for k, _, _ in todo])  # bad input fails here, first
    _check([configs[k] for k, _, _ in todo], prepared)
    with ExitStack() as stack:
        for _, out, _ in todo:
            stack.enter_context(folder_lock(out))
        members = [Member(f"pack{i}", configs[k], p, out, action,
                          make_plan(configs[k], len(p.train_features), 1), torch.get_rng_state())
                   for i, ((k, out, action), p) in enumerate(zip(todo, prepared))]
        for (k, _, _), result in zip(todo, _train_pack(members, log)):
            results[k] = result
    return [results[k] for k in range(len(configs))]


def _train_pack(members: list[Member], log: Any) -> list[RunResult]:
    t0 = members[0].config.train
    torch.set_num_threads(t0.num_threads or (os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _build(members).to(device)
    precision = resolve_precision(t0.precision, device.type,
                                  members[0].counts["backbone_non_embedding"])

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    for member in members:
        _setup_member(member, model)
        if member.action in ("new", "overwrite"):
            _clear_run_files(member.out)
        write_json(member.out / "config.json", to_dict(member.config))
    pad = members[0].p.tokenizer.pad_token_id
    task = members[0].p.task
    started = time.perf_counter()
    with MemoryPeak() as memory:
        model.train()
        active = list(members)
        while active:
            batches = []
            for member in active:
                indices = member.next_batch()
                batch = task.collate([member.p.train_features[i] for i in indices], pad)
                batches.append({k: v.to(device) for k, v in batch.items()})
            losses: list[Any] = [None] * len(active)
            for group in length_groups(batches):
                with autocast():
                    outputs = pack_forward(model, [active[g] for g in group],
                                           [batches[g] for g in group], pad, training=True)
                for g, out in zip(group, outputs):
                    member = active[g]
                    losses[g] = out.loss * (_labelled_in(batches[g]) / member.labelled_per_batch)
                    if not torch.isfinite(losses[g].detach()):
                        raise TrainingDiverged(
                            f"{member.out}: loss is {losses[g].item()} at optimizer step "
                            f"{member.state.step + 1} (lower train.lr, or use "
                            "train.precision=fp32)")
                # Members share no trainable parameter: one backward pass per group gives each
                # its own gradient, and frees the group's activations before the next.
                torch.stack([losses[g] for g in group]).sum().backward()
            for member, batch, loss in zip(active, batches, losses):
                t = member.config.train
                if t.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(member.params, t.max_grad_norm)
                member.optimizer.step()
                member.scheduler.step()
                member.optimizer.zero_grad(set_to_none=True)
                s = member.state
                s.step += 1
                s.real_tokens += int(batch["attention_mask"].sum())
                s.padded_tokens += batch["attention_mask"].numel()
                s.add_loss(loss.item())
            due = [m for m in active if m.state.step % m.plan.eval_every == 0
                   or m.state.step == m.plan.total_steps]
            if due:
                _evaluate(model, due, device, autocast, started, log)
            for member in active:
                if member.state.step >= member.plan.total_steps or member.state.stopped_early:
                    member.finished, member.wall = True, time.perf_counter() - started
            ending = [m for m in active if m.finished]
            if ending:
                _finish(model, ending, device, autocast)
            active = [m for m in active if not m.finished]
    results = []
    for member in members:
        results.append(_write_results(member, members, precision, memory))
    return results


def _evaluate(model: nn.Module, due: list[Member], device: Any, autocast: Any,
              started: float, log: Any) -> None:
    """An evaluation of the members due, as `train._evaluate_and_keep_best` does alone."""
    paused = time.perf_counter()
    groups = {s: [m for m in due if bool(m.p.selection_features) == (s == "selection")]
              for s in ("selection", "dev")}
    for split, group in groups.items():
        if not group:
            continue
        for member, (scores, stats) in zip(group, pack_evaluate(model, group, split, device,
                                                                 autocast)):
            metrics = save_if_better(member.p, member.state, scores, stats, lambda m=member:
                                     write_adapter(MemberView(model, m.name), m.p.run,
                                                   m.p.labels, m.out / ADAPTER_DIR))
            kept = track_best(member.p, member.state, metrics, lambda m=member: {
                m.alone_name(n): w.detach().to("cpu", copy=True)
                for n, w in model.named_parameters() if m.own(n)})
            if kept is not None:
                member.best_weights = kept
            s = member.state
            s.evals = [*s.evals, {"step": s.step, "train_loss": s.take_window_loss(),
                                  "lr": member.scheduler.get_last_lr()[0], **metrics}]
            log(f"{member.out.name} step {s.step}: {split} " + ", ".join(
                f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    spent = time.perf_counter() - paused
    for member in due:
        member.state.overhead += spent


def _finish(model: nn.Module, ending: list[Member], device: Any, autocast: Any) -> None:
    """Members with a selection split: dev scored once, on the kept checkpoint's weights (as
    `train._score_kept_checkpoint_on_dev`)."""
    selecting = [m for m in ending if m.p.selection_features]
    if not selecting:
        return
    own = dict(model.named_parameters())
    with torch.no_grad():
        for member in selecting:
            for name, tensor in (member.best_weights or {}).items():
                own[name.replace(".default.", f".{member.name}.")].copy_(tensor.to(device))
    for member, (scores, stats) in zip(selecting, pack_evaluate(model, selecting, "dev",
                                                                  device, autocast)):
        member.state.best_dev, member.state.best_example_stats = scores, stats


def _write_results(member: Member, members: list[Member], precision: str,
                   memory: MemoryPeak) -> RunResult:
    metrics = final_metrics(member.p, member.state, member.wall, None, plan=member.plan,
                            params=member.counts, precision=precision, memory=memory,
                            processes=1)
    metrics["adapter_bytes"] = sum(f.stat().st_size for f in
                                   (member.out / ADAPTER_DIR).glob("*.safetensors"))
    # Time and memory are the pack's, shared by its members.
    metrics["pack"] = {"size": len(members), "adapter": member.name,
                       "members": [m.out.name for m in members], "peak_memory_mb": memory.peak_mb}
    write_json(member.out / "metrics.json", metrics)
    return RunResult(member.out, metrics, member.config)

