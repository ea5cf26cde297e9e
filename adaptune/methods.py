"""Adapter methods: one small class per method, registered in one place (`METHODS`).

A method instance holds its options (`MethodConfig`, whose method-specific fields live in the
method's own section, e.g. `method.adalora.tinit`) and supplies every method-specific step as a
hook, so the training flow, the checkpoints, the adapter folder and the sweep have no branch on
the method:

    check(model_spec)                 refuse a model the method cannot apply to, before loading
    check_task(task)                  refuse a task it cannot serve (generation, for prompts)
    apply(model, model_spec, steps)   make the task model trainable (peft wrap, freezing)
    optimizer(model, lr, decay)       AdamW over the trainable parameters (LoRA+: its own)
    before_train(model, batches)      a data pass before training (EVA's initialisation)
    after_step(model, step)           after every optimizer step (AdaLoRA's budget)
    checkpoint_state / restore_checkpoint_state   extra state a resumed run needs
    save(model, folder) / load(base, folder) / merge(model)   the trained state

- lora, dora, adalora, ia3, beft, vera, loha, lokr, oft, and any other peft method through
  `peft` (a peft config passed through): from peft, with the task head in `modules_to_save`, so
  the saved adapter folder holds the head and loads with plain `peft.PeftModel.from_pretrained`.
  rsLoRA is LoRA's `method.scaling=rslora`; PiSSA, OLoRA and EVA are `method.lora.init`; LoRA+
  is `method.lora.loraplus_lr_ratio`.
- prompt_tuning, prefix_tuning: peft's prompt learning on the backbone (its feature-extraction
  model), the head saved beside it.
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
    sections: ClassVar[tuple[str, ...]] = ()  # its own option sections of MethodConfig
    # Whether it trains weights of the pretrained backbone itself (full, BitFit), rather than
    # added ones and the head: model.dropout=auto keeps the checkpoint's dropout only then.
    trains_backbone: ClassVar[bool] = False

    def __init__(self, options: MethodConfig) -> None:
        self.options = options

    @property
    def extra_positions(self) -> int:
        """Positions the method adds to every input (virtual tokens), out of the model's."""
        return 0

    def check(self, model: ModelSpec) -> None:
        """Raise NotApplicable if the method cannot apply to this model."""

    def check_task(self, task: Any) -> None:
        """Raise NotApplicable if the method cannot serve this task."""

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, without weight decay on biases and norms."""
        return torch.optim.AdamW(param_groups(model.named_parameters(), weight_decay), lr=lr)

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
        _save_parameters(model, folder, lambda name, param: param.requires_grad)

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


def _save_parameters(model: nn.Module, folder: Path,
                     keep: Callable[[str, nn.Parameter], bool]) -> None:
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if keep(n, p)}
    save_file(state, str(folder / STATE_WEIGHTS), metadata={"format": "pt"})


def param_groups(named: Iterable[tuple[str, nn.Parameter]],
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable ones of these named parameters: no weight decay on biases
    and norms (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, param in named:
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
    trains_backbone = True

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        return _freeze_all_but(model, lambda name: True)


class Head(Method):
    name, description = "head", "the task head only"

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        return _freeze_all_but(model, _is_head)


class BitFit(Method):
    name, description = "bitfit", "every bias, plus the head"
    trains_backbone = True
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
        from peft.utils import ModulesToSaveWrapper

        # The trained head goes back in place of its wrapper first: peft's unloading assumes a
        # wrapped module is a Linear (IA3, VeRA, LoHa, ... fail on a head with sub-modules).
        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                trained = module.modules_to_save[module.active_adapters[0]]
                setattr(parent, name.rsplit(".", 1)[-1], trained)
        return model.merge_and_unload()


class Lora(PeftMethod):
    name, description = "lora", "LoRA (peft) on attention, plus the head"
    has_scaling = True
    sections = ("lora",)
    use_dora = False
    # Initialisations that move the base weights (the base keeps the residual): the saved
    # adapter is converted back to one for the untouched base (peft's
    # path_initial_model_for_weight_conversion), so it loads on a freshly built base.
    MOVES_BASE = ("pissa", "olora")

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import EvaConfig, LoraConfig

        o = self.options
        init = {"default": True, "gaussian": "gaussian"}.get(o.lora.init, o.lora.init)
        return LoraConfig(r=o.rank, lora_alpha=o.lora_alpha, lora_dropout=o.dropout,
                          use_rslora=o.scaling == "rslora", use_dora=self.use_dora,
                          init_lora_weights=init, target_modules=targets,
                          # The attention mask picks the tokens EVA's SVD sees (peft's label
                          # mask assumes one label per token, not one per sentence).
                          eva_config=EvaConfig(rho=o.lora.eva_rho, use_label_mask=False)
                          if init == "eva" else None,
                          modules_to_save=[HEAD], bias="none")

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        import tempfile

        peft_model = super().apply(model, spec, total_steps)
        if self.options.lora.init_from:
            _start_from(peft_model, Path(self.options.lora.init_from))
        if self.options.lora.stack_on:
            _stack(peft_model, Path(self.options.lora.stack_on))
        if self.options.lora.init in self.MOVES_BASE:
            # The adapter as initialised, before training: what the conversion subtracts.
            self._initial = tempfile.TemporaryDirectory(prefix="adaptune-initial-adapter-")
            config = peft_model.peft_config["default"]
            config.init_lora_weights = True  # so the saved initial adapter reloads as-is
            peft_model.save_pretrained(self._initial.name, safe_serialization=True)
            config.init_lora_weights = self.options.lora.init
        return peft_model

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        ratio = self.options.lora.loraplus_lr_ratio
        if not ratio:
            return super().optimizer(model, lr, weight_decay)
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr,
                                         loraplus_lr_ratio=ratio, weight_decay=weight_decay)

    def before_train(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
        if self.options.lora.init != "eva":
            return
        from peft import initialize_lora_eva_weights

        # EVA: A from the singular vectors of each target's input activations, over training
        # batches (the labels are not used; the forward pass is only observed).
        initialize_lora_eva_weights(model, dataloader=batches)

    def load(self, base: nn.Module, folder: Path) -> nn.Module:
        model = super().load(base, folder)
        if (folder / STACKED).is_dir():  # the frozen adapter this one was trained on top of
            model.load_adapter(str(folder / STACKED), adapter_name=STACKED)
            _activate_both(model)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        initial = getattr(self, "_initial", None)
        if initial is None:
            # With a stacked adapter, peft writes it to folder/stacked/ beside the trained one.
            return super().save(model, folder)
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        head = {k: v.detach().contiguous().cpu() for k, v in
                get_peft_model_state_dict(model).items() if f".{HEAD}." in f".{k}"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(str(folder), safe_serialization=True,
                                  path_initial_model_for_weight_conversion=initial.name)
        # peft 0.21's conversion drops the modules_to_save weights (the task head): put them
        # back, or the converted adapter would not load (KeyError on the head).
        weights = folder / "adapter_model.safetensors"
        state = load_file(str(weights))
        save_file({**state, **{k: v for k, v in head.items() if k not in state}}, str(weights),
                  metadata={"format": "pt"})


def _start_from(model: nn.Module, folder: Path, adapter: str = "default") -> None:
    """Copy the LoRA matrices of the adapter in `folder` into `model`'s, layer by layer: matched
    on the name from the transformer layers on (`encoder.layer.3.attention.self.query.lora_A`),
    so an adapter trained inside another task model (a masked-LM head's) fits. Every LoRA
    matrix of `model` must be found, with its shape."""
    from adaptune.safe_io import load_safetensors

    source = {k: v for k, v in load_safetensors(folder / "adapter_model.safetensors").items()
              if ".lora_" in k}

    def layer_key(name: str) -> str:
        name = name.replace(f".{adapter}.", ".").replace(".default.", ".")
        for anchor in (".encoder.", ".layers.", ".layer."):
            if anchor in name:
                return name[name.index(anchor):]
        return name

    by_layer = {layer_key(k): v for k, v in source.items()}
    own = {n: p for n, p in model.named_parameters() if ".lora_" in n and f".{adapter}." in n}
    missing = [n for n in own if layer_key(n) not in by_layer]
    if missing or not own:
        raise ConfigError(f"method.lora.init_from: {folder} has no LoRA matrix for {missing[:2]} "
                          "(trained on other layers, or not a LoRA adapter?)")
    with torch.no_grad():
        for name, param in own.items():
            value = by_layer[layer_key(name)]
            if value.shape != param.shape:
                raise ConfigError(f"method.lora.init_from: {folder}: {layer_key(name)} has "
                                  f"shape {tuple(value.shape)}, this run's is "
                                  f"{tuple(param.shape)} (another rank?)")
            param.copy_(value)


STACKED = "stacked"  # the peft adapter name (and subfolder) of a frozen, stacked adapter


def _stack(model: nn.Module, folder: Path) -> None:
    """Add the LoRA adapter in `folder` under the trained one, frozen: an adapter of the same
    targets and rank, filled from the folder's matrices by layer name, both active."""
    import json

    from peft import LoraConfig

    saved = json.loads((folder / "adapter_config.json").read_text())
    config = model.peft_config["default"]
    model.add_adapter(STACKED, LoraConfig(
        r=saved["r"], lora_alpha=saved["lora_alpha"], use_rslora=saved.get("use_rslora", False),
        target_modules=config.target_modules, bias="none"))
    _start_from(model, folder, adapter=STACKED)
    _activate_both(model)


def _activate_both(model: nn.Module) -> None:
    """Both adapters active in every LoRA layer, only "default" trainable. (Set on the layers:
    peft's model-level set_adapter refuses two adapters while the head is a modules_to_save
    module.)"""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(["default", STACKED])
    for name, param in model.named_parameters():
        if f".{STACKED}." in name:
            param.requires_grad_(False)


class Dora(Lora):
    name = "dora"
    description = "DoRA (peft): LoRA on the direction, a trained magnitude per output"
    use_dora = True


class Vera(PeftMethod):
    name, description = "vera", "VeRA (peft): shared frozen random projections, two trained vectors"
    sections = ("vera",)

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import VeraConfig

        o = self.options
        return VeraConfig(r=o.rank, target_modules=targets, d_initial=o.vera.d_initial,
                          projection_prng_key=o.vera.projection_prng_key, save_projection=True,
                          vera_dropout=o.dropout, modules_to_save=[HEAD])


class _Lycoris(PeftMethod):
    """LoHa and LoKr (peft's LyCORIS family): the same budget fields, their own config class."""

    config_name: ClassVar[str]

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        import peft

        o = self.options
        return getattr(peft, self.config_name)(
            r=o.rank, alpha=o.lora_alpha, rank_dropout=0.0, module_dropout=o.dropout,
            target_modules=targets, modules_to_save=[HEAD])


class LoHa(_Lycoris):
    name, description = "loha", "LoHa (peft): Hadamard product of two low-rank pairs"
    config_name = "LoHaConfig"


class LoKr(_Lycoris):
    name, description = "lokr", "LoKr (peft): Kronecker product of two small factors"
    config_name = "LoKrConfig"


class Oft(PeftMethod):
    name, description = "oft", "OFT (peft): block-diagonal orthogonal rotation of layer inputs"
    has_rank = False
    sections = ("oft",)

    def largest_rank(self) -> int:
        return 1  # no rank; the block size is checked against the layers instead

    def resolve_targets(self, model: nn.Module, default: tuple[str, ...]) -> list[str]:
        targets = super().resolve_targets(model, default)
        size = self.options.oft.block_size
        for name, layer in linear_modules(model).items():
            if any(_matches(name, t) for t in targets) and layer.in_features % size:
                raise NotApplicable(f"oft: method.oft.block_size={size} does not divide the "
                                    f"input width {layer.in_features} of {name}; choose a "
                                    "divisor of it")
        return targets

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import OFTConfig

        return OFTConfig(r=0, oft_block_size=self.options.oft.block_size,
                         target_modules=targets, module_dropout=self.options.dropout,
                         modules_to_save=[HEAD])


class Ia3(PeftMethod):
    name = "ia3"
    description = "IA3 (peft): learned rescaling of keys, values and the feed-forward input"
    has_rank = False
    # IA3's own targets (Liu et al., 2022), by layer name: attention keys and values (their
    # outputs rescaled) and the feed-forward output layer (its input rescaled).
    KEYS_VALUES = ("key", "value", "k", "v", "k_proj", "v_proj")
    FEED_FORWARD_OUT = ("output.dense", "down_proj", "fc2")

    def largest_rank(self) -> int:
        return 1

    def feed_forward(self, model: nn.Module) -> list[str]:
        return [name for name in linear_modules(model)
                if any(_matches(name, t) for t in self.FEED_FORWARD_OUT)
                and ".attention." not in name]

    def resolve_targets(self, model: nn.Module, default: tuple[str, ...]) -> list[str]:
        if self.options.targets:
            return super().resolve_targets(model, default)
        names = [n for n in linear_modules(model) if n.rsplit(".", 1)[-1] in self.KEYS_VALUES]
        return names + self.feed_forward(model)

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import IA3Config

        return IA3Config(target_modules=targets, modules_to_save=[HEAD],
                         feedforward_modules=[t for t in targets if t in self._ffn])

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        self._ffn = set(self.feed_forward(model))
        return super().apply(model, spec, total_steps)


class Beft(PeftMethod):
    name = "beft"
    description = "BEFT (peft): trained bias vectors on chosen layers (default: the values)"
    has_rank = False
    refusal = ("beft: {model} has no bias parameters; BEFT trains additions to existing biases "
               "(peft refuses layers without one). Use lora, or ia3.")

    def largest_rank(self) -> int:
        return 1

    def check(self, model: ModelSpec) -> None:
        if model.has_biases is False:
            raise NotApplicable(self.refusal.format(model=model.name))

    def resolve_targets(self, model: nn.Module, default: tuple[str, ...]) -> list[str]:
        if self.options.targets:
            targets = super().resolve_targets(model, default)
        else:  # BEFT's finding (and peft's default): the value projection's bias
            targets = [n for n in linear_modules(model)
                       if n.rsplit(".", 1)[-1] in ("value", "v", "v_proj")]
        layers = linear_modules(model)
        if any(layers[n].bias is None for n in layers if any(_matches(n, t) for t in targets)):
            raise NotApplicable(self.refusal.format(model="this model"))
        return targets

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        from peft import BeftConfig

        return BeftConfig(target_modules=targets, modules_to_save=[HEAD])


class PeftPassThrough(PeftMethod):
    name = "peft"
    description = "any other peft method: method.peft.config holds its peft config"
    has_rank = False
    sections = ("peft",)

    def largest_rank(self) -> int:
        return 1

    def peft_config(self, targets: list[str], total_steps: int) -> Any:
        import dataclasses
        import json

        from peft import get_peft_config

        data = json.loads(self.options.peft.config)
        try:
            config = get_peft_config(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"method.peft.config: peft refused it: {exc}") from None
        names = {f.name for f in dataclasses.fields(config)}
        if "target_modules" in names and not data.get("target_modules"):
            config.target_modules = set(targets)
        if "modules_to_save" in names:
            config.modules_to_save = sorted(set(config.modules_to_save or []) | {HEAD})
        return config


class _PromptLearning(Method):
    """Prompt and prefix tuning (peft's prompt learning): trained virtual tokens, put before
    the input's embeddings (prompt tuning) or before every layer's keys and values (prefix
    tuning). peft runs them through its task-model classes, which a backbone under a separate
    head is not; its feature-extraction model is the backbone alone, so that is what peft wraps
    here. The head is then outside peft: it is saved beside peft's files (`trainable.safetensors`)
    and the backbone's folder part loads with plain `PeftModel.from_pretrained(backbone, folder)`.
    TaskModel hands the head only the input's own positions."""

    peft_type: ClassVar[str]

    @property
    def own(self) -> Any:
        return getattr(self.options, self.name)

    @property
    def extra_positions(self) -> int:
        return self.own.virtual_tokens

    def check_task(self, task: Any) -> None:
        if task.generates:
            raise NotApplicable(f"{self.name}: the {task.name} task predicts by generating, "
                                "and peft's feature-extraction model does not put the virtual "
                                "tokens before generated text; use lora")

    def peft_config(self, spec: ModelSpec) -> Any:
        raise NotImplementedError

    def apply(self, model: nn.Module, spec: ModelSpec, total_steps: int) -> nn.Module:
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.backbone = get_peft_model(model.backbone, self.peft_config(spec))
        # peft drops token type ids under prompt learning (the virtual tokens have none) and
        # says so on every forward pass; the README says it once.
        warnings.filterwarnings("ignore", message="Token type ids are not supported for "
                                "parameter efficient tuning")
        _freeze_all_but(model, lambda name: _is_head(name) or ".prompt_encoder." in name)
        self._probe(model.backbone, spec)
        return model

    def _probe(self, backbone: nn.Module, spec: ModelSpec) -> None:
        """Refuse, before training, a model family peft's prompt learning does not run on (its
        attention or cache code differs): one forward pass on two tokens. Any exception is
        that refusal, so it is caught whole."""
        ids = torch.ones(1, 2, dtype=torch.long, device=next(backbone.parameters()).device)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            first = (str(exc).splitlines() or [""])[0][:200]
            raise NotApplicable(f"{self.name}: peft's {self.peft_type} does not run on "
                                f"{spec.name}: {type(exc).__name__}: {first}; "
                                "use lora") from None

    def save(self, model: nn.Module, folder: Path) -> None:
        model.backbone.save_pretrained(str(folder), safe_serialization=True)
        if any(_is_head(name) for name, _ in model.named_parameters()):  # (a causal LM's has none)
            _save_parameters(model, folder, lambda name, param: _is_head(name))

    def load(self, base: nn.Module, folder: Path) -> nn.Module:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base.backbone = PeftModel.from_pretrained(base.backbone, str(folder))
        return super().load(base, folder) if (folder / STATE_WEIGHTS).exists() else base

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotApplicable(f"{self.name}: its virtual tokens are extra inputs, not a change of "
                            "weights, so there is nothing to fold into the base; load the "
                            "adapter without merging")


class PromptTuning(_PromptLearning):
    name = "prompt_tuning"
    description = "prompt tuning (peft): trained embeddings of virtual tokens before the input"
    peft_type = "prompt tuning"
    sections = ("prompt_tuning",)

    def peft_config(self, spec: ModelSpec) -> Any:
        from peft import PromptTuningConfig

        o = self.own
        return PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                  num_virtual_tokens=o.virtual_tokens,
                                  prompt_tuning_init="TEXT" if o.init_text else "RANDOM",
                                  prompt_tuning_init_text=o.init_text or None,
                                  tokenizer_name_or_path=spec.path if o.init_text else None)


class PrefixTuning(_PromptLearning):
    name = "prefix_tuning"
    description = "prefix tuning (peft): trained keys and values of virtual tokens in every layer"
    peft_type = "prefix tuning"
    sections = ("prefix_tuning",)

    def peft_config(self, spec: ModelSpec) -> Any:
        from peft import PrefixTuningConfig

        o = self.own
        return PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                  num_virtual_tokens=o.virtual_tokens,
                                  prefix_projection=o.projection_size > 0,
                                  encoder_hidden_size=o.projection_size or None)


class AdaLora(PeftMethod):
    name = "adalora"
    sections = ("adalora",)
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

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Lora, Dora, AdaLora, Ia3, Beft, Vera, LoHa, LoKr, Oft, PromptTuning, PrefixTuning,
    PeftPassThrough, BitFit, Full, Head)}
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
    width = max(map(len, METHODS))
    return "\n".join(f"{m.name:<{width}}  {m.description}" for m in METHODS.values())
