"""Backbones and the task model: a frozen pretrained backbone composed with a small task head.

`TaskModel` is a plain `nn.Module` with two children, `backbone` (a Hugging Face model) and
`task_head` (the task's own module). peft wraps it like any custom model, with `task_head` in
`modules_to_save`, so the head is saved inside the adapter and restored by
`PeftModel.from_pretrained` -- the single most reported pain of peft users (heads lost on load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from adaptune.spec import ResolvedRun


@dataclass
class TaskOutput:
    """What every task head returns. `loss` is None without labels. peft's AdaLoRA adds its
    orthogonality penalty to `loss` in place, which is why this is a mutable object."""

    loss: torch.Tensor | None
    logits: Any


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:  # decoders: pad with eos, as their configs expect
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_task_model(run: "ResolvedRun", labels: list[str], pad_token_id: int | None
                     ) -> "TaskModel":
    """The pretrained backbone with the task's freshly initialised head: what training starts
    from and what a saved adapter is loaded onto, as the resolved run describes it (model,
    quantization, attention kernel, backbone dropout, task)."""
    spec, task, quantization = run.model, run.task, run.config.model.quantization
    backbone = load_backbone(spec.path, spec.family, lm_head=task.lm_head,
                             quantization=quantization, attention=run.config.model.attention,
                             dropout=run.backbone_dropout)
    if pad_token_id is not None and getattr(backbone.config, "pad_token_id", None) is None:
        backbone.config.pad_token_id = pad_token_id
    head = task.build_head(backbone.config.hidden_size, labels, spec, backbone.config)
    if quantization != "none":  # the head trains in fp32 next to the quantized base
        head.to(next(backbone.parameters()).device)
    return TaskModel(backbone, head)


def load_backbone(path: str, family: str, *, lm_head: bool = False,
                  dtype: torch.dtype = torch.float32, quantization: str = "none",
                  attention: str = "auto", dropout: str = "checkpoint") -> nn.Module:
    """Load the pretrained body. Encoders lose their pooler (the heads pool themselves, the same
    way on every model; an unused pooler would also break multi-process training). Decoders keep
    their LM head only for generation tasks. `quantization` ("4bit" NF4 or "8bit") loads the
    frozen weights through bitsandbytes on the GPU, as QLoRA does. `dropout`: "checkpoint"
    (the config's own rates) or a rate for every dropout of the config."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # The load report lists the dropped pooler as "unexpected": noise for our users.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    # Never run code shipped with a checkpoint (and never prompt for it in a terminal).
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if quantization != "none":
        kwargs.update(quantization_kwargs(quantization))
    if attention != "auto":
        kwargs["attn_implementation"] = attention
    if dropout != "checkpoint":
        # As a transformers user would: config overrides passed to from_pretrained, so every
        # module built from them (nn.Dropout layers, the rate handed to the attention kernel)
        # uses the new rate.
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        kwargs.update({key: float(dropout) for key in dropout_keys(config)})
    if family == "decoder" and lm_head:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        try:
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
        except TypeError:  # architectures without a pooler do not take the argument
            model = AutoModel.from_pretrained(path, **kwargs)
    # Training and scoring never reuse past keys and values, yet a decoder with `use_cache` on
    # fills a KV cache in every forward pass (which also makes torch.compile recompile each
    # block). Generation is unaffected: `generate` follows its own generation config.
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    return model


def dropout_keys(config: Any) -> list[str]:
    """The dropout rates of a transformers config, whatever the architecture names them
    (hidden_dropout_prob and attention_probs_dropout_prob in BERT, attention_dropout in Llama,
    resid_pdrop/embd_pdrop/attn_pdrop in GPT-2, dropout/attention_dropout in others). Rates of
    heads adaptune does not use (classifier_dropout, GPT-2's summary_first_dropout) are
    included: they are harmless there, and a head-specific rule would miss new names."""
    return sorted(key for key, value in config.to_dict().items()
                  if ("dropout" in key or key.endswith("pdrop"))
                  and isinstance(value, (int, float)) and not isinstance(value, bool))


# bitsandbytes runs 4- and 8-bit layers on the CPU from this release on (its CPU backend);
# before it, CUDA only.
BNB_CPU_VERSION = (0, 50)


def quantization_kwargs(quantization: str) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit (NF4, bf16 compute, double quantization) or 8-bit
    frozen base, through the `bitsandbytes` package (the `gpu` extra): on the GPU, or on the
    CPU with bitsandbytes >= 0.50 (slow there, but it lets a quantized adapter be checked,
    merged and served without a GPU)."""
    from adaptune.errors import ConfigError

    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"model.quantization={quantization} needs the bitsandbytes package: "
                          "pip install 'adaptune[gpu]'") from None
    if torch.cuda.is_available():
        device: Any = torch.cuda.current_device()
    else:
        version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
        if version < BNB_CPU_VERSION:
            raise ConfigError(f"model.quantization={quantization} needs a CUDA GPU with "
                              f"bitsandbytes {bitsandbytes.__version__} (its CPU backend starts "
                              "at 0.50: pip install -U bitsandbytes), or "
                              "model.quantization=none on the CPU")
        device = "cpu"
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16,
                                    bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device}}


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation: `torch.compile` each repeated transformer block in place, rather
    than the whole model. The blocks share one compiled graph, so compiling costs about one
    block instead of all of them, and the Python around the blocks (masks, heads, peft's wrapper)
    stays eager. Blocks are the classes a Hugging Face model names in `_no_split_modules` that
    occur more than once, or else the members of its longest `nn.ModuleList` of one class.
    Shapes are marked dynamic (batches differ in length). Returns the number of blocks."""
    named: set[str] = set()
    for module in model.modules():
        named.update(getattr(module, "_no_split_modules", None) or ())
    by_class: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if type(module).__name__ in named:
            by_class.setdefault(type(module).__name__, []).append(module)
    blocks = [m for group in by_class.values() if len(group) > 1 for m in group]
    if not blocks:
        lists = [list(m) for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
                 and len({type(x) for x in m}) == 1]
        blocks = max(lists, key=len, default=[])
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def count_backbone_params(backbone: nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameters; tied weights counted once."""
    total = sum(p.numel() for p in backbone.parameters())
    embedding = 0
    seen: set[int] = set()
    for module in backbone.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            embedding += module.weight.numel()
    return total, total - embedding


class TaskModel(nn.Module):
    """backbone + head. The head gets the backbone's last hidden states (or its logits, for
    language-model heads that reuse the backbone's own output layer) and the batch; a head that
    ties its output to the word embeddings (masked LM) also gets the embedding matrix, so that
    the tie survives peft copying the head into the adapter."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_head = head  # the name matters: see methods.HEAD
        # Read once here: peft later wraps the head in a ModulesToSaveWrapper.
        self.head_uses_logits = bool(getattr(head, "uses_logits", False))
        self.head_ties_embeddings = bool(getattr(head, "ties_embeddings", False))
        # Mirrors HF models so peft and accelerate find what they look for: peft wraps a 4/8-bit
        # layer in its bitsandbytes LoRA layer (which merges by de- and re-quantizing) only when
        # the model it is given says it is loaded in 4/8 bits; otherwise it takes the plain
        # Linear path, which trains but corrupts the packed weights when merging.
        self.config = backbone.config
        # (`is_quantized` is the flag transformers keeps true; `dequantize()` leaves the others.)
        if getattr(backbone, "is_quantized", False):
            for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized",
                         "quantization_method"):
                if hasattr(backbone, flag):
                    setattr(self, flag, getattr(backbone, flag))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **batch: Any) -> TaskOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch.pop("token_type_ids")
        out = self.backbone(**inputs)
        features = out.logits if self.head_uses_logits else out.last_hidden_state
        # Prompt tuning's virtual tokens come first in the backbone's output: the head sees the
        # input's own positions only.
        features = features[:, features.shape[1] - input_ids.shape[1]:]
        if self.head_ties_embeddings:
            batch["embeddings"] = self.backbone.get_input_embeddings().weight
        return self.task_head(features, attention_mask=attention_mask, **batch)


class CausalLMHead(nn.Module):
    """Next-token loss on the backbone's own logits, over label positions only (-100 elsewhere).
    No parameters: the decoder's output layer is part of the backbone."""

    uses_logits = True

    def forward(self, logits: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, **_: Any) -> TaskOutput:
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                               labels[:, 1:].flatten(), ignore_index=-100)
        return TaskOutput(loss, logits)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of the last real token of each row (decoders see the whole text only
    there). Works for right padding, which is what the collators produce."""
    last = attention_mask.sum(1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
