"""Adapter methods: one small class per method, registered in one place (`METHODS`).

A method instance holds its options (`MethodConfig`, whose method-specific fields live in the
method's own section, e.g. `method.adalora.tinit`) and supplies every method-specific step as a
hook, so the training flow, the checkpoints, the adapter folder and the sweep have no branch on
the method:

    check(model_spec)                 refuse a model the method cannot apply to, before loading
    apply(model, model_spec, steps)   make the task model trainable (peft wrap, freezing)
    before_train(model, batches)      a data pass before training (none of today's methods)
    after_step(model, step)           after every optimizer step (AdaLoRA's budget)
    checkpoint_state / restore_checkpoint_state   extra state a resumed run needs
    save(model, folder) / load(base, folder) / merge(model)   the trained state

- lora, adalora: from peft, with the task head in `modules_to_save`, so the saved adapter folder
  holds the head and loads with plain `peft.PeftModel.from_pretrained`.
- bitfit: every bias of the backbone plus the head (Ben Zaken et al., 2022).
- full: every parameter (baseline).
- head: only the task head (baseline: a linear probe on frozen features).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from adaptune.config import MethodConfig
from adaptune.errors import ConfigError, ModelError, NotApplicable
from adaptune.spec import ModelSpec

# The TaskModel's head attribute. Not "head": peft matches modules_to_save by plain suffix, and
# "head" would also catch a decoder's `lm_head` and train a full copy of the output layer.
HEAD = "task_head"
STATE_WEIGHTS = "trainable.safetensors"  # our file for bitfit / full / head


class Method:
    """The uniform unit. Subclasses set `name`, `description` and `has_rank` and override the
    hooks they need; the defaults do nothing."""

    name: ClassVar[str]
    description: ClassVar[str]
    has_rank: ClassVar[bool] = False  # the rank axis of a sweep applies
    has_scaling: ClassVar[bool] = False  # method.scaling (alpha/r or rslora) applies

    def __init__(self, options: MethodConfig) -> None:
        self.options = options

    def check(self, model: ModelSpec) -> None:
        """Raise NotApplicable if the method cannot apply to this model."""

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        raise NotImplementedError

    def before_train(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
        """A pass over training batches before the first step."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (counting from 1), before zero_grad()."""

    def checkpoint_state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """Method state beyond parameters and optimizer that a resumed run needs."""
        return {}, {}

    def restore_checkpoint_state(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                                 meta: dict) -> None:
        """Put back what `checkpoint_state` returned."""

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the trained state into `folder`: a safetensors file of the trainable
        parameters (peft methods write peft's adapter files instead)."""
        from safetensors.torch import save_file

        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
                 if p.requires_grad}
        save_file(state, str(folder / STATE_WEIGHTS), metadata={"format": "pt"})

    def load(self, base: nn.Module, folder: Path) -> nn.Module:
        """Restore what `save` wrote onto a freshly built `base`."""
        from adaptune.safe_io import load_safetensors

        state = load_safetensors(folder / STATE_WEIGHTS)
        own = dict(base.named_parameters())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ModelError(f"{folder / STATE_WEIGHTS}: tensors {unknown[:5]} do not belong to "
                             "the model it was loaded onto (another base model or task?)")
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ModelError(f"{folder / STATE_WEIGHTS}: {name} has shape "
                                 f"{tuple(tensor.shape)}, the model expects "
                                 f"{tuple(own[name].shape)}")
        base.load_state_dict(state, strict=False)
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        """The model with any adapter folded into the base weights (no inference overhead)."""
        return model


# ----------------------------------------------------------------------------------------------
# Methods that train a subset of the model's own parameters.


def _freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> nn.Module:
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
    return model


def _is_head(name: str) -> bool:
    return name.startswith(HEAD + ".")


class Full(Method):
    name, description = "full", "every parameter"

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        return _freeze_all_but(model, lambda name: True)


class Head(Method):
    name, description = "head", "the task head only"

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        return _freeze_all_but(model, _is_head)


class BitFit(Method):
    name, description = "bitfit", "every bias, plus the head"
    refusal = ("bitfit: {model} has no bias parameters, so BitFit would train only the task "
               "head. Use method.name=head for that, or lora.")

    def check(self, model: ModelSpec) -> None:
        if model.has_biases is False:
            raise NotApplicable(self.refusal.format(model=model.name))

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        biases = {n for n, _ in model.named_parameters()
                  if n.startswith("backbone.") and n.endswith(".bias")}
        if not biases:
            raise NotApplicable(self.refusal.format(model=spec.name))
        return _freeze_all_but(model, lambda name: _is_head(name) or name in biases)


# ----------------------------------------------------------------------------------------------
# peft methods. Target modules follow peft's rule: the full name equals the target or ends in
# ".target".


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The backbone's linear layers by full name (the head and any LM output layer excluded)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("backbone.")
            and not name.endswith("lm_head")}


class PeftMethod(Method):
    """A method that peft implements: `peft_config` builds its config; saving, loading and
    merging are peft's."""

    has_rank = True

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        raise NotImplementedError

    def largest_rank(self) -> int:
        return self.options.rank

    def resolve_targets(self, model: nn.Module, default: tuple[str, ...]) -> list[str]:
        """The target names to hand to peft, checked against the model: every target must
        match at least one linear layer, and the rank must fit every matched layer."""
        cfg = self.options
        linears = linear_modules(model)
        if cfg.targets == ("all-linear",):
            targets = list(linears)  # full names: unambiguous, and never the head
        else:
            targets = list(cfg.targets or default)
            if not targets:
                raise ConfigError("method.targets: this model has no default LoRA targets; "
                                  "name some, e.g. method.targets=q_proj,v_proj, or all-linear")
        short = sorted({name.split(".")[-1] for name in linears})
        for target in targets:
            matched = [m for name, m in linears.items() if _matches(name, target)]
            if not matched:
                raise ConfigError(f"method.targets: {target!r} matches no linear layer of the "
                                  f"model; its linear layers end in: {', '.join(short)}")
            for layer in matched:
                limit = min(layer.in_features, layer.out_features)
                if self.largest_rank() > limit:
                    raise NotApplicable(f"method.rank: {self.largest_rank()} is larger than the "
                                        f"layer {target!r} allows ({layer.in_features} x "
                                        f"{layer.out_features}: at most {limit})")
        return targets

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(self.resolve_targets(model, spec.default_targets),
                                  total_steps)
        with warnings.catch_warnings():
            # transformers 5 + peft 0.21 warn about `is_gradient_checkpointing` on every wrap.
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)

    def save(self, model: nn.Module, folder: Path) -> None:
        with warnings.catch_warnings():
            # AdaLoRA may prune a module to rank 0; peft then warns about "invalid shapes" as if
            # DeepSpeed shards had not been gathered. Here they are simply empty.
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            model.save_pretrained(str(folder), safe_serialization=True)

    def load(self, base: nn.Module, folder: Path) -> nn.Module:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # AdaLoRA: peft re-applies the saved rank pattern itself, then warns that the
            # pattern's keys "did not match"; the loaded weights are right (tested).
            warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
            return PeftModel.from_pretrained(base, str(folder))

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


class Lora(PeftMethod):
    name, description = "lora", "LoRA (peft) on attention, plus the head"
    has_scaling = True

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o.rank, lora_alpha=o.lora_alpha, lora_dropout=o.dropout,
                          use_rslora=o.scaling == "rslora", target_modules=targets,
                          modules_to_save=[HEAD], bias="none")


class AdaLora(PeftMethod):
    name = "adalora"
    description = "AdaLoRA (peft) with its rank-budget schedule driven by the flow, plus the head"

    @property
    def init_rank(self) -> int:
        return self.options.adalora.init_rank or math.ceil(1.5 * self.options.rank)

    def largest_rank(self) -> int:
        return max(self.options.rank, self.init_rank)

    def schedule(self, total_steps: int) -> dict[str, int]:
        """AdaLoRA's three phases in optimizer steps, derived from the run's real length:
        warm-up at the initial rank, budget pruning every delta_t steps, then a final phase at
        the target."""
        a = self.options.adalora
        tinit = int(a.tinit * total_steps)
        tfinal = int(a.tfinal * total_steps)
        if total_steps - tfinal - tinit < 1:  # too short a run for the fractions: keep a step
            tinit, tfinal = 0, max(0, total_steps - 1)
        return {"total_step": max(total_steps, 1), "tinit": tinit, "tfinal": tfinal,
                "deltaT": min(a.delta_t, max(1, total_steps - tinit - tfinal))}

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import AdaLoraConfig

        o = self.options
        return AdaLoraConfig(target_r=o.rank, init_r=self.init_rank, lora_alpha=o.lora_alpha,
                             lora_dropout=o.dropout, orth_reg_weight=o.adalora.orth_reg_weight,
                             target_modules=targets, modules_to_save=[HEAD],
                             **self.schedule(total_steps))

    def after_step(self, model: nn.Module, step: int) -> None:
        # peft's budget schedule: must run after optimizer.step() and before zero_grad(), every
        # step. Without it AdaLoRA silently trains as plain LoRA at init_r (peft #432, #1327,
        # #2337).
        model.base_model.update_and_allocate(step)

    def checkpoint_state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """The rank allocator's importance scores and the rank pattern pruned so far."""
        allocator = model.base_model.rankallocator
        tensors = {f"{kind}/{name}": t.detach().contiguous().cpu()
                   for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
                   for name, t in getattr(allocator, kind).items()}
        config = model.peft_config[model.base_model.trainable_adapter_name]
        pattern = {k: (v.tolist() if torch.is_tensor(v) else v)
                   for k, v in (config.rank_pattern or {}).items()}
        return tensors, {"rank_pattern": pattern}

    def restore_checkpoint_state(self, model: nn.Module, tensors: dict[str, torch.Tensor],
                                 meta: dict) -> None:
        allocator = model.base_model.rankallocator
        device = next(model.parameters()).device
        for key, tensor in tensors.items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = tensor.to(device)
        if meta.get("rank_pattern"):
            config = model.peft_config[model.base_model.trainable_adapter_name]
            config.rank_pattern = meta["rank_pattern"]


# ----------------------------------------------------------------------------------------------
# The registry: one line per method. The config, the CLI, the sweep and the report read it.

METHODS: dict[str, type[Method]] = {m.name: m for m in (Lora, AdaLora, BitFit, Full, Head)}
RANKED_METHODS = tuple(name for name, m in METHODS.items() if m.has_rank)


def build_method(options: MethodConfig) -> Method:
    try:
        return METHODS[options.name](options)
    except KeyError:
        raise ConfigError(f"method.name: unknown method {options.name!r}; known: "
                          f"{', '.join(METHODS)}") from None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). peft keeps a frozen original of each `modules_to_save` module next to
    the trained copy; the original is not part of the adapted model and is not counted."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def describe_methods() -> str:
    return "\n".join(f"{m.name:<8} {m.description}" for m in METHODS.values())
