"""Adapter methods: a registry of small, uniform units.

Each method says how to make a `TaskModel` trainable (`apply`), what to do after every optimizer
step (`after_step`: only AdaLoRA needs it), and how its trained state is saved and loaded. The
training flow calls these hooks and contains no method-specific branches.

- lora, adalora: from peft, with the task head in `modules_to_save`, so the saved adapter folder
  holds the head and loads with plain `peft.PeftModel.from_pretrained`.
- bitfit: every bias of the backbone plus the head (Ben Zaken et al., 2022).
- full: every parameter (baseline).
- head: only the task head (baseline: a linear probe on frozen features).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from adaptune.config import MethodConfig
from adaptune.errors import ConfigError, ModelError, NotApplicable

# The TaskModel's head attribute. Not "head": peft matches modules_to_save by plain suffix, and
# "head" would also catch a decoder's `lm_head` and train a full copy of the output layer.
HEAD = "task_head"
STATE_WEIGHTS = "trainable.safetensors"  # our file for bitfit / full / head


@dataclass(frozen=True)
class Method:
    name: str
    uses_peft: bool
    # (model, method config, default targets, total optimizer steps) -> the model to train
    apply: Callable[[nn.Module, MethodConfig, tuple[str, ...], int], nn.Module]
    # (model being trained, optimizer step just taken, counting from 1) -> None
    after_step: Callable[[nn.Module, int], None] = lambda model, step: None
    description: str = ""


# ----------------------------------------------------------------------------------------------
# Target modules (peft's matching rule: the full name equals the target or ends in ".target").


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The backbone's linear layers by full name (the head and any LM output layer excluded)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("backbone.")
            and not name.endswith("lm_head")}


def resolve_targets(model: nn.Module, cfg: MethodConfig, default: tuple[str, ...]) -> list[str]:
    """The target names to hand to peft, checked against the model: every target must match at
    least one linear layer, and the rank must fit every matched layer."""
    linears = linear_modules(model)
    if cfg.targets == ("all-linear",):
        targets = list(linears)  # full names: unambiguous, and never the head
    else:
        targets = list(cfg.targets or default)
        if not targets:
            raise ConfigError("method.targets: this model has no default LoRA targets; name "
                              "some, e.g. method.targets=q_proj,v_proj, or all-linear")
    short = sorted({name.split(".")[-1] for name in linears})
    for target in targets:
        matched = [m for name, m in linears.items() if _matches(name, target)]
        if not matched:
            raise ConfigError(f"method.targets: {target!r} matches no linear layer of the model; "
                              f"its linear layers end in: {', '.join(short)}")
        for layer in matched:
            limit = min(layer.in_features, layer.out_features)
            if max(cfg.rank, cfg.adalora_init_rank if cfg.name == "adalora" else 0) > limit:
                raise NotApplicable(f"method.rank: {cfg.rank} is larger than the layer "
                                    f"{target!r} allows ({layer.in_features} x "
                                    f"{layer.out_features}: at most {limit})")
    return targets


# ----------------------------------------------------------------------------------------------
# The methods.


def _freeze_all_but(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> nn.Module:
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name, param))
    return model


def _apply_full(model: nn.Module, cfg: MethodConfig, default, total_steps: int) -> nn.Module:
    return _freeze_all_but(model, lambda name, p: True)


def _apply_head(model: nn.Module, cfg: MethodConfig, default, total_steps: int) -> nn.Module:
    return _freeze_all_but(model, lambda name, p: name.startswith(HEAD + "."))


def _apply_bitfit(model: nn.Module, cfg: MethodConfig, default, total_steps: int) -> nn.Module:
    biases = [n for n, _ in model.named_parameters()
              if n.startswith("backbone.") and n.endswith(".bias")]
    if not biases:
        raise NotApplicable("bitfit: this model has no bias parameters, so BitFit would train "
                            "only the task head. Use method.name=head for that, or lora.")
    return _freeze_all_but(model, lambda name, p: name.startswith(HEAD + ".") or name in biases)


def _peft_wrap(model: nn.Module, peft_config) -> nn.Module:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # transformers 5 + peft 0.21 warn about `is_gradient_checkpointing` on every wrap.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, peft_config)


def _apply_lora(model: nn.Module, cfg: MethodConfig, default, total_steps: int) -> nn.Module:
    from peft import LoraConfig

    targets = resolve_targets(model, cfg, default)
    return _peft_wrap(model, LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
        target_modules=targets, modules_to_save=[HEAD], bias="none"))


def adalora_schedule(cfg: MethodConfig, total_steps: int) -> dict[str, int]:
    """AdaLoRA's three phases in optimizer steps, derived from the run's real length: warm-up at
    the initial rank, budget pruning every delta_t steps, then a final phase at the target."""
    tinit = int(cfg.tinit * total_steps)
    tfinal = int(cfg.tfinal * total_steps)
    if total_steps - tfinal - tinit < 1:  # too short a run for the fractions: keep one step
        tinit, tfinal = 0, max(0, total_steps - 1)
    return {"total_step": max(total_steps, 1), "tinit": tinit, "tfinal": tfinal,
            "deltaT": min(cfg.delta_t, max(1, total_steps - tinit - tfinal))}


def _apply_adalora(model: nn.Module, cfg: MethodConfig, default, total_steps: int) -> nn.Module:
    from peft import AdaLoraConfig

    targets = resolve_targets(model, cfg, default)
    return _peft_wrap(model, AdaLoraConfig(
        target_r=cfg.rank, init_r=cfg.adalora_init_rank, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout, orth_reg_weight=cfg.orth_reg_weight,
        target_modules=targets, modules_to_save=[HEAD], **adalora_schedule(cfg, total_steps)))


def _adalora_after_step(model: nn.Module, step: int) -> None:
    # peft's budget schedule: must run after optimizer.step() and before zero_grad(), every step.
    # Without it AdaLoRA silently trains as plain LoRA at init_r (peft #432, #1327, #2337).
    model.base_model.update_and_allocate(step)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", True, _apply_lora, description="LoRA (peft) on attention, plus the head"),
        Method("adalora", True, _apply_adalora, _adalora_after_step,
               "AdaLoRA (peft) with its rank-budget schedule driven by the flow, plus the head"),
        Method("bitfit", False, _apply_bitfit, description="every bias, plus the head"),
        Method("full", False, _apply_full, description="every parameter"),
        Method("head", False, _apply_head, description="the task head only"),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(METHODS)}") \
            from None


# ----------------------------------------------------------------------------------------------
# Parameter counts, saving, loading, merging.


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


def save_trained(model: nn.Module, method: Method, folder: Path) -> None:
    """Write the trained state into `folder` (which must exist): peft's adapter files, or a
    safetensors file of the trainable parameters."""
    from safetensors.torch import save_file

    if method.uses_peft:
        with warnings.catch_warnings():
            # AdaLoRA may prune a module to rank 0; peft then warns about "invalid shapes" as if
            # DeepSpeed shards had not been gathered. Here they are simply empty.
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            model.save_pretrained(str(folder), safe_serialization=True)
        return
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
             if p.requires_grad}
    save_file(state, str(folder / STATE_WEIGHTS), metadata={"format": "pt"})


def load_trained(base: nn.Module, method: Method, folder: Path) -> nn.Module:
    """Restore the trained state saved by `save_trained` onto a freshly built `base`."""
    if method.uses_peft:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # AdaLoRA: peft re-applies the saved rank pattern itself, then warns that the
            # pattern's keys "did not match"; the loaded weights are right (tested).
            warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
            return PeftModel.from_pretrained(base, str(folder))
    from adaptune.safe_io import load_safetensors

    state = load_safetensors(folder / STATE_WEIGHTS)
    own = dict(base.named_parameters())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ModelError(f"{folder / STATE_WEIGHTS}: tensors {unknown[:5]} do not belong to the "
                         "model it was loaded onto (another base model or task?)")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ModelError(f"{folder / STATE_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[name].shape)}")
    base.load_state_dict(state, strict=False)
    return base


def merged(model: nn.Module, method: Method) -> nn.Module:
    """The model with adapters folded into the base weights: no adapter overhead at inference."""
    if method.uses_peft:
        return model.merge_and_unload()
    return model


def describe_methods() -> str:
    return "\n".join(f"{m.name:<8} {m.description}" for m in METHODS.values())
