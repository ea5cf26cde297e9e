"""A run resolved once: which model (and the facts about it), which task, which method.

Everything downstream -- the training flow, prediction, the sweep, domain adaptation and the
benchmarks -- takes a `ResolvedRun` (or its `ModelSpec`) instead of looking names up again:

    run = resolve(config)      # zoo lookup / Hub id check, family, targets; task and method built
    run.model.family           # Family.ENCODER or Family.DECODER
    run.task.encode(...)       # the task instance holds its own options
    run.method.apply(...)      # the method instance holds its own options

Resolving checks what can be checked without loading weights (the task accepts the model family,
the method applies to the model, the length fits its positions), so bad input fails here, before
anything is written.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import zoo
from adaptune.config import RunConfig
from adaptune.errors import ConfigError, ModelError

if TYPE_CHECKING:  # imported for annotations only: methods and tasks import this module
    from adaptune.methods import Method
    from adaptune.tasks import Task


class Family(str, enum.Enum):
    """BERT-style encoders and GPT-style decoders: heads pool, and tasks accept, differently.
    A str enum, so it is written to JSON as "encoder" / "decoder"."""

    ENCODER = "encoder"
    DECODER = "decoder"


# model_type values of decoder-only (causal LM) architectures, for configs that name no
# architecture.
DECODER_TYPES = {"gpt2", "llama", "gemma", "gemma2", "gemma3_text", "mistral", "qwen2", "qwen3",
                 "phi", "phi3", "gpt_neox", "opt", "smollm3", "olmo", "falcon"}


@dataclass(frozen=True)
class ModelSpec:
    """What adaptune needs to know about a base model, found once."""

    name: str  # as the user gave it: zoo short name, Hub id or folder
    path: str  # what from_pretrained loads
    family: Family
    default_targets: tuple[str, ...]  # LoRA-family targets when method.targets is empty
    has_biases: bool | None  # None: not known before the weights are loaded
    max_positions: int | None  # longest sequence the position embeddings allow, if bounded

    @property
    def pooling(self) -> str:
        """How a sequence-level head reads the hidden states: encoders average every token,
        decoders see the whole text only at the last token."""
        return "mean" if self.family is Family.ENCODER else "last"


def family_of(config: Any) -> Family:
    """DECODER for causal LMs (GPT-style), else ENCODER (BERT-style), from a transformers
    config."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_decoder", False) or "CausalLM" in archs or "LMHead" in archs:
        return Family.DECODER
    return Family.DECODER if getattr(config, "model_type", "") in DECODER_TYPES \
        else Family.ENCODER


def resolve_model(name: str) -> ModelSpec:
    """The zoo entry of that name (installed and converted on first use), else a local folder
    or Hub id that transformers can read a config from."""
    from transformers import AutoConfig

    path = zoo.resolve(name) if name in zoo.ZOO else _check_model_name(name)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if getattr(hf_config, "model_type", "") in ("bert", "mpnet", "roberta", "xlm-roberta"):
        # RoBERTa-style position ids start after the padding index.
        offset = 2 if hf_config.model_type in ("mpnet", "roberta", "xlm-roberta") else 0
        positions = positions - offset if positions else None
    if name in zoo.ZOO:
        entry = zoo.ZOO[name]
        return ModelSpec(name, path, Family(entry.family), entry.lora_targets, entry.has_bias,
                         positions)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    targets = tuple(MAP.get(getattr(hf_config, "model_type", ""), ()))
    return ModelSpec(name, path, family_of(hf_config), targets, None, positions)


def _check_model_name(name: str) -> str:
    """A name outside the zoo must be a local folder or look like a Hub id (owner/name or a
    bare name); otherwise say what the zoo has."""
    if Path(name).exists() or ("/" in name and not name.startswith((".", "/"))) or \
            os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(name, trust_remote_code=False)
            return name
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name: cannot load {name!r} ({str(exc).splitlines()[0]}); "
                             f"zoo models: {', '.join(zoo.ZOO)}") from None
    raise ModelError(f"model.name: {name!r} is neither a zoo model, a local folder nor a "
                     f"reachable Hub id; zoo models: {', '.join(zoo.ZOO)}")


@dataclass(frozen=True)
class ResolvedRun:
    """A config with its names resolved: the model's facts, the task and the method, each
    built once with its own options."""

    config: RunConfig
    model: ModelSpec
    task: "Task"
    method: "Method"

    @property
    def backbone_dropout(self) -> str:
        """model.dropout with "auto" resolved: "checkpoint" (the config's own rates) where the
        method trains the backbone's weights, else "0" (a frozen backbone's dropout only
        perturbs fixed features: slower, and it cost dev F1 where measured)."""
        chosen = self.config.model.dropout
        if chosen != "auto":
            return chosen
        return "checkpoint" if self.method.trains_backbone else "0"


def resolve(config: RunConfig) -> ResolvedRun:
    """Resolve `config`: the model's facts, the task and the method, checked together."""
    from adaptune.methods import build_method
    from adaptune.tasks import build_task

    task = build_task(config)
    method = build_method(config.method)
    spec = resolve_model(config.model.name)
    task.check(spec)
    method.check(spec)
    method.check_task(task)
    virtual = method.extra_positions  # prompt and prefix tuning's tokens take positions too
    if spec.max_positions and config.model.max_length + virtual > spec.max_positions:
        also = f" with {virtual} virtual tokens of method.name={method.name}" if virtual else ""
        raise ConfigError(f"model.max_length: {config.model.max_length} is more than "
                          f"{spec.name} has positions for ({spec.max_positions}){also}; use at "
                          f"most {spec.max_positions - virtual}")
    return ResolvedRun(config, spec, task, method)
