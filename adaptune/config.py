"""Run configuration: frozen, typed dataclasses that hold every default exactly once.

A run is described by one `RunConfig`, made of four sections (model, method, data, train).
YAML files and command-line overrides (`train.lr=1e-3`) only *replace* fields; an unknown key, a
value of the wrong type or an impossible value is a `ConfigError` that names the field.

    cfg = RunConfig()                                         # all defaults
    cfg = load_config("my.yaml", overrides=["method.rank=16"])
    cfg = cfg.replace(train={"epochs": 2})                    # a changed copy
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from adaptune.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


ATTENTION_KERNELS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                     "flex_attention")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to adapt: a zoo short name, a Hub id or a local folder."""

    name: str = "minilm-l6"  # a zoo name (adaptune zoo list), a Hub id or a local folder
    max_length: int = 128  # tokens per sequence (or per window, for QA)
    # Frozen base weights in 4-bit NF4 or 8-bit (bitsandbytes: GPU, or CPU from 0.50), as QLoRA.
    quantization: str = "none"
    # How a classification head reads an encoder's tokens: "mean" (every token averaged: the
    # same on every model, pooler or not) or "pooler" (BERT's: dense + tanh on the first
    # token, trained from scratch; exports as a standard *ForSequenceClassification model).
    # "auto": mean on encoders, the last token on decoders.
    pooling: str = "auto"
    # The attention kernel, as transformers' `attn_implementation`. "auto": in training, sdpa
    # or eager, whichever a short measurement on the run's model and batches finds faster here
    # (eager only where its extra memory is bounded; adaptune.attention), elsewhere
    # transformers' choice (scaled_dot_product_attention where the architecture has it, else
    # eager); "flash_attention_2" needs the flash-attn package and a GPU.
    attention: str = "auto"
    # Dropout inside the pretrained backbone (hidden states and attention probabilities):
    # "checkpoint" keeps the checkpoint's own rates (0.1 in BERT-style configs); a number sets
    # every dropout rate of the backbone's config to it (the task head keeps its own). "auto":
    # 0 where the method leaves the backbone's own weights frozen (LoRA and the other adapters,
    # head-only), the checkpoint's where it trains them (full fine-tuning, BitFit). By
    # measurement: on minilm-l6 CoNLL-2003 NER with LoRA, the frozen backbone's dropout cost 12%
    # of CPU training time and 0.008 dev F1, lower on each of 3 seeds
    # (benchmarks/results/throughput_cpu_ner_avx2_backbone_dropout.md).
    dropout: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "a zoo name, Hub id or folder", self.name)
        _check(self.dropout in ("auto", "checkpoint") or _is_rate(self.dropout), "model.dropout",
               "auto, checkpoint, or a number in [0, 1)", self.dropout)
        _check(self.attention in ATTENTION_KERNELS, "model.attention",
               f"one of {', '.join(ATTENTION_KERNELS)}", self.attention)
        _check(self.quantization in ("none", "4bit", "8bit"), "model.quantization",
               "one of none, 4bit, 8bit", self.quantization)
        _check(self.max_length >= 8, "model.max_length", "an integer >= 8", self.max_length)
        _check(self.pooling in ("auto", "mean", "pooler"), "model.pooling",
               "one of auto, mean, pooler", self.pooling)


@dataclass(frozen=True)
class AdaLoraOptions:
    """AdaLoRA's own options (`method.adalora.*`). The budget schedule is given as fractions of
    the total number of optimizer steps: the flow computes peft's `total_step` itself, which is
    what peft users most often get wrong."""

    init_rank: int = 0  # 0 means ceil(1.5 * method.rank), the AdaLoRA paper's setting
    tinit: float = 0.1  # share of the run at the initial rank, before pruning starts
    tfinal: float = 0.2  # share of the run at the final budget, after pruning
    delta_t: int = 10  # optimizer steps between budget re-allocations
    orth_reg_weight: float = 0.1  # weight of the orthogonality penalty on P and Q

    def __post_init__(self) -> None:
        _check(self.init_rank >= 0, "method.adalora.init_rank", "an integer >= 0",
               self.init_rank)
        _check(0 <= self.tinit < 1 and 0 <= self.tfinal < 1 and self.tinit + self.tfinal < 1,
               "method.adalora.tinit/tfinal", "fractions in [0, 1) that sum to less than 1",
               (self.tinit, self.tfinal))
        _check(self.delta_t >= 1, "method.adalora.delta_t", "a positive integer", self.delta_t)
        _check(self.orth_reg_weight >= 0, "method.adalora.orth_reg_weight", "a number >= 0",
               self.orth_reg_weight)


LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva")


@dataclass(frozen=True)
class LoraOptions:
    """Options of LoRA and DoRA (`method.lora.*`)."""

    # How A and B start (peft's init_lora_weights): "default" (A Kaiming-uniform, B zero),
    # "gaussian", "pissa" (principal singular vectors; the base keeps the residual), "olora"
    # (QR), "eva" (singular vectors of activations, from a pass over training batches).
    init: str = "default"
    # LoRA+ (Hayou et al., 2024): B learns this many times faster than A; 0 = off (the paper
    # suggests 16). peft's create_loraplus_optimizer builds the optimizer.
    loraplus_lr_ratio: float = 0.0
    eva_rho: float = 2.0  # EVA's rank redistribution limit (peft's EvaConfig.rho)
    # Start A and B from another LoRA adapter's (a folder; e.g. a domain stage's, to continue
    # training it on the task). Matched by layer name; the adapter's head is not taken.
    init_from: str = ""
    # Keep another LoRA adapter (a folder; e.g. a domain stage's) frozen under the one trained
    # here: both apply, only this one trains, and the saved adapter carries the frozen one in
    # its stacked/ subfolder, loaded with it. Matched by layer name, like init_from.
    stack_on: str = ""

    def __post_init__(self) -> None:
        _check(self.init in LORA_INITS, "method.lora.init", f"one of {', '.join(LORA_INITS)}",
               self.init)
        _check(self.loraplus_lr_ratio == 0 or self.loraplus_lr_ratio >= 1,
               "method.lora.loraplus_lr_ratio", "0 (off) or a ratio >= 1", self.loraplus_lr_ratio)
        _check(self.eva_rho >= 1, "method.lora.eva_rho", "a number >= 1", self.eva_rho)


@dataclass(frozen=True)
class VeraOptions:
    """VeRA's own options (`method.vera.*`); its rank is method.rank (VeRA uses large ones,
    e.g. 256: the shared random matrices are frozen, only two vectors per layer train)."""

    d_initial: float = 0.1  # initial value of the trained scaling vector d
    projection_prng_key: int = 0  # seed of the shared random projections (saved with them)

    def __post_init__(self) -> None:
        _check(self.d_initial > 0, "method.vera.d_initial", "a positive number", self.d_initial)


@dataclass(frozen=True)
class OftOptions:
    """OFT's own options (`method.oft.*`): orthogonal blocks of this size rotate each adapted
    layer's input (peft's oft_block_size); it must divide the layers' input width."""

    block_size: int = 32  # size of each orthogonal block (peft oft_block_size)

    def __post_init__(self) -> None:
        _check(self.block_size >= 2, "method.oft.block_size", "an integer >= 2",
               self.block_size)


@dataclass(frozen=True)
class PromptTuningOptions:
    """Prompt tuning's own options (`method.prompt_tuning.*`, Lester et al., 2021): trained
    embeddings of virtual tokens, put before every input."""

    virtual_tokens: int = 20  # how many virtual tokens (each one embedding wide)
    # Start the virtual tokens from these words' embeddings (peft's TEXT init), e.g. "Classify
    # the sentiment of this review"; empty: random.
    init_text: str = ""

    def __post_init__(self) -> None:
        _check(self.virtual_tokens >= 1, "method.prompt_tuning.virtual_tokens",
               "a positive integer", self.virtual_tokens)


@dataclass(frozen=True)
class PrefixTuningOptions:
    """Prefix tuning's own options (`method.prefix_tuning.*`, Li & Liang, 2021): trained keys
    and values of virtual tokens, put before every layer's own."""

    virtual_tokens: int = 20  # how many virtual tokens (a key and a value in every layer)
    # Train the prefix through a two-layer MLP of this width (the paper's reparameterisation,
    # peft's prefix_projection) instead of directly; 0: directly.
    projection_size: int = 0

    def __post_init__(self) -> None:
        _check(self.virtual_tokens >= 1, "method.prefix_tuning.virtual_tokens",
               "a positive integer", self.virtual_tokens)
        _check(self.projection_size >= 0, "method.prefix_tuning.projection_size",
               "an integer >= 0 (0: no projection)", self.projection_size)


@dataclass(frozen=True)
class PeftPassThrough:
    """Any other peft method (`method.name=peft`): `method.peft.config` is the peft config as
    JSON or a YAML mapping, with its `peft_type` (e.g. {"peft_type": "FOURIERFT",
    "n_frequency": 1000}). Missing `target_modules` get the model's default targets and the task
    head is added to `modules_to_save`."""

    config: str = ""  # the peft config, JSON or a YAML mapping, with its peft_type

    def __post_init__(self) -> None:
        if not self.config:
            return
        try:
            data = json.loads(self.config)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"method.peft.config: expected a JSON mapping, got "
                              f"{self.config!r} ({exc})") from None
        _check(isinstance(data, dict) and "peft_type" in data, "method.peft.config",
               "a mapping with a peft_type, e.g. {\"peft_type\": \"FOURIERFT\"}", self.config)


@dataclass(frozen=True)
class MethodConfig:
    """How the frozen model is adapted. The budget fields (rank, alpha, dropout, targets) are
    shared by the LoRA family; options that belong to one method live in that method's own
    section (`method.adalora.tinit=0.1`), and setting them for another method is an error."""

    name: str = "lora"  # the method (adaptune methods lists them)
    rank: int = 8  # LoRA rank; AdaLoRA's *target* average rank
    alpha: float = 0.0  # LoRA scaling numerator; 0 means 2 * rank
    # LoRA dropout. 0 by measurement: on minilm-l6 CoNLL-2003 NER, 0.1 cost 35% of CPU step
    # time (random masks) and gained nothing (dev F1 0.8655 with 0.1, 0.8660 with 0).
    dropout: float = 0.0
    # Module names to adapt (suffix match, as in peft). Empty: the model's default (query/value
    # style). "all-linear": every linear layer of the backbone.
    targets: tuple[str, ...] = ()
    # How the low-rank update is scaled: "alpha/r" (LoRA's alpha / rank) or "rslora"
    # (alpha / sqrt(rank), Kalajdzievski 2023; peft's use_rslora). With alpha fixed across ranks,
    # alpha/r shrinks a high rank's update, which then learns slower at one lr.
    scaling: str = "alpha/r"
    lora: LoraOptions = field(default_factory=LoraOptions)
    adalora: AdaLoraOptions = field(default_factory=AdaLoraOptions)
    vera: VeraOptions = field(default_factory=VeraOptions)
    oft: OftOptions = field(default_factory=OftOptions)
    peft: PeftPassThrough = field(default_factory=PeftPassThrough)
    prompt_tuning: PromptTuningOptions = field(default_factory=PromptTuningOptions)
    prefix_tuning: PrefixTuningOptions = field(default_factory=PrefixTuningOptions)

    def __post_init__(self) -> None:
        from adaptune.methods import METHODS  # the one registry (imported late: it imports us)

        _check(self.name in METHODS, "method.name", f"one of {', '.join(METHODS)}", self.name)
        _check(self.rank >= 1, "method.rank", "a positive integer", self.rank)
        _check(self.alpha >= 0, "method.alpha", "a number >= 0 (0 means 2 * rank)", self.alpha)
        _check(0 <= self.dropout < 1, "method.dropout", "a number in [0, 1)", self.dropout)
        _check(self.scaling in SCALINGS, "method.scaling", f"one of {', '.join(SCALINGS)}",
               self.scaling)
        if self.scaling != "alpha/r" and not METHODS[self.name].has_scaling:
            raise ConfigError(f"method.scaling={self.scaling} applies to LoRA-style methods "
                              f"({', '.join(n for n, m in METHODS.items() if m.has_scaling)}), "
                              f"not to method.name={self.name}")
        own = METHODS[self.name].sections
        for section in METHOD_SECTIONS:
            options, default = getattr(self, section), type(getattr(self, section))()
            if section not in own and options != default:
                changed = [f.name for f in fields(options)
                           if getattr(options, f.name) != getattr(default, f.name)]
                owners = [n for n, m in METHODS.items() if section in m.sections]
                raise ConfigError(f"method.{section}.{changed[0]} is an option of "
                                  f"{' and '.join(owners)}, but method.name is {self.name!r}")
        if self.name == "peft" and not self.peft.config:
            raise ConfigError("method.peft.config: method.name=peft needs a peft config, e.g. "
                              "method.peft.config='{\"peft_type\": \"FOURIERFT\"}'")

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


# Methods with a section of their own in MethodConfig.
METHOD_SECTIONS = ("lora", "adalora", "vera", "oft", "peft", "prompt_tuning", "prefix_tuning")
SCALINGS = ("alpha/r", "rslora")


@dataclass(frozen=True)
class DataConfig:
    """Which task and data. `dataset` names a set under the data root (see adaptune.datasets) or
    is left to `train_path`/`dev_path` for your own files."""

    task: str = "classification"  # classification, ner, qa, summarization or lm
    dataset: str = "sst2"  # a named set under the data root (README: Data sets)
    train_path: str = ""  # overrides the dataset's train file
    dev_path: str = ""  # overrides the dataset's dev file
    data_dir: str = ""  # data root; empty: $ADAPTUNE_DATA, else ../shared/data
    max_train_examples: int = 0  # 0: all; else the first N after a seeded shuffle
    train_fraction: float = 1.0  # fraction of the training set, taken after the shuffle
    max_dev_examples: int = 0  # 0: all
    # A selection split carved from the training file (before train_fraction and
    # max_train_examples, by its own seed, so every seed and data size of a grid selects on the
    # same examples, and none of them is trained on). When set, the periodic evaluations that
    # pick the kept checkpoint and stop early score this split, never dev; dev is scored only
    # for the kept checkpoint, for reporting.
    selection_examples: int = 0
    selection_seed: int = 0  # which training examples form the selection split
    # Field names for generic CSV / TSV / JSON-lines classification files.
    text_field: str = "text"
    text_pair_field: str = ""  # a second text column (sentence pairs), if any
    label_field: str = "label"  # the label column of generic files
    # How train_path / dev_path are read: "auto" (by the file: .parquet and .arrow files and
    # save_to_disk folders through `datasets`, everything else by adaptune's own readers), or
    # through a `datasets` builder: json, csv, parquet, arrow, disk (a save_to_disk folder).
    format: str = "auto"
    # Column names of `datasets` tables, per task (the Hugging Face hub's usual names).
    tokens_field: str = "tokens"  # NER: the words of a sentence
    tags_field: str = "ner_tags"  # NER: one tag per word (names, or ClassLabel ids)
    question_field: str = "question"  # QA
    context_field: str = "context"  # QA
    answers_field: str = "answers"  # QA: {"text": [...], "answer_start": [...]}
    document_field: str = "document"  # summarization
    summary_field: str = "summary"  # summarization: a text or a list of references
    # Language modelling (task "lm"): "mlm" masked LM (encoders), "clm" causal LM (decoders),
    # "auto" picks by the model.
    lm_objective: str = "auto"
    # Classification: "balanced" weighs each training example's loss by n / (classes x its
    # class's count), so that a rare class counts as much as a common one (for skewed sets such
    # as legal_unfair_tos, 90% one class, where the plain loss learns the majority only).
    class_weights: str = "none"

    def __post_init__(self) -> None:
        _check(self.max_train_examples >= 0, "data.max_train_examples", "an integer >= 0",
               self.max_train_examples)
        _check(0 < self.train_fraction <= 1, "data.train_fraction", "a number in (0, 1]",
               self.train_fraction)
        _check(self.max_dev_examples >= 0, "data.max_dev_examples", "an integer >= 0",
               self.max_dev_examples)
        _check(self.selection_examples >= 0, "data.selection_examples", "an integer >= 0",
               self.selection_examples)
        _check(self.lm_objective in ("auto", "mlm", "clm"), "data.lm_objective",
               "one of auto, mlm, clm", self.lm_objective)
        _check(self.class_weights in ("none", "balanced"), "data.class_weights",
               "one of none, balanced", self.class_weights)
        _check(self.class_weights == "none" or self.task == "classification",
               "data.class_weights", f"none for data.task={self.task} (class weights are a "
               "classification option)", self.class_weights)
        formats = ("auto", "json", "csv", "parquet", "arrow", "disk")
        _check(self.format in formats, "data.format", f"one of {', '.join(formats)}",
               self.format)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation. Steps are optimizer steps (after gradient accumulation)."""

    epochs: float = 1.0  # passes over the training data (the maximum, with early stopping)
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW, linear warm-up then linear decay)
    weight_decay: float = 0.01  # AdamW weight decay (none on biases and norms)
    warmup_ratio: float = 0.06  # share of the steps spent warming the lr up
    max_grad_norm: float = 1.0  # gradient clipping; 0: none
    # auto: fp32 or bf16 autocast, whichever a probe of this run's model and batches measures
    # faster on this device (adaptune.precision; cached per device and model); or fp32, bf16.
    precision: str = "auto"
    seed: int = 42  # training order, initialisation, dropout; and the training subset
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of each epoch
    # Instead of eval_every: this many evaluations per epoch, whatever the data size (a data
    # sweep then checks every size as often per pass over its data). 0: use eval_every.
    evals_per_epoch: int = 0
    # Early stopping: stop after this many evaluations of the selection split
    # (data.selection_examples) without improvement; train.epochs is then the maximum. 0: off.
    early_stopping_patience: int = 0
    # Pause after this fraction of the planned steps (a checkpoint is kept; the schedule is still
    # the whole run's, so rerunning with a larger fraction or 0 continues it exactly): what
    # successive halving uses to give a learning rate a first, short rung. 0: no pause.
    pause_at_fraction: float = 0.0
    eval_batch_size: int = 128  # examples per evaluation batch
    group_by_length: bool = True  # batches of similar length: far less padding
    log_every: int = 50  # optimizer steps between progress-bar updates of loss and lr
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0: none
    num_threads: int = 0  # torch intra-op threads per process; 0: the CPU's cores / processes
    # torch.compile each repeated transformer block: "off", "on", or "auto" (adaptune.compiling:
    # on when the predicted saving over the run's steps exceeds the compile cost, both measured
    # once per machine and model and cached; off for runs too short to pay). It pays only in
    # long runs: smollm2-135m on 2 CPU cores, 125 steps: 63 s eager, 169 s compiled with a cold
    # compile cache, 69 s warm; steps once compiled 10-15% faster, so it pays after roughly
    # 2,000 steps cold (benchmarks/results/throughput_cpu_compile.md). true/false mean on/off.
    compile: str = "auto"
    # Experiment tracking through accelerate: none, tensorboard, trackio, mlflow, wandb or aim
    # (install the tracker's package; none of them needs a network).
    report_to: str = "none"
    tracking_dir: str = ""  # where trackers write; empty: <output_dir>/tracking
    run_name: str = ""  # the run's name in the tracker; empty: the output folder's name
    run_tags: tuple[str, ...] = ()  # key=value tags (a sweep tags each cell with its axes)

    def __post_init__(self) -> None:
        _check(self.epochs > 0 or self.max_steps > 0, "train.epochs/max_steps",
               "a positive number of epochs or steps", (self.epochs, self.max_steps))
        _check(self.max_steps >= 0, "train.max_steps", "an integer >= 0", self.max_steps)
        _check(self.batch_size >= 1, "train.batch_size", "a positive integer", self.batch_size)
        _check(self.grad_accum >= 1, "train.grad_accum", "a positive integer", self.grad_accum)
        _check(self.lr > 0, "train.lr", "a positive number", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "a number in [0, 1)",
               self.warmup_ratio)
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "a number >= 0 (0: no clipping)",
               self.max_grad_norm)
        _check(self.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}",
               self.precision)
        _check(self.eval_every >= 0, "train.eval_every", "an integer >= 0", self.eval_every)
        _check(self.evals_per_epoch >= 0, "train.evals_per_epoch", "an integer >= 0",
               self.evals_per_epoch)
        _check(not (self.evals_per_epoch and self.eval_every), "train.evals_per_epoch",
               "0 when train.eval_every is set (one or the other)", self.evals_per_epoch)
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience",
               "an integer >= 0", self.early_stopping_patience)
        _check(0 <= self.pause_at_fraction < 1, "train.pause_at_fraction",
               "a fraction in [0, 1) (0: no pause)", self.pause_at_fraction)
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "a positive integer",
               self.eval_batch_size)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0",
               self.checkpoint_every)
        _check(self.num_threads >= 0, "train.num_threads", "an integer >= 0", self.num_threads)
        _check(math.isfinite(self.epochs), "train.epochs", "a finite number", self.epochs)
        _check(self.log_every >= 1, "train.log_every", "a positive integer", self.log_every)
        _check(0 <= self.seed < 2**32, "train.seed", "an integer in [0, 2**32)", self.seed)
        trackers = ("none", "tensorboard", "trackio", "mlflow", "wandb", "aim")
        _check(self.report_to in trackers, "train.report_to", f"one of {', '.join(trackers)}",
               self.report_to)
        _check(self.compile in COMPILE_MODES, "train.compile",
               f"one of {', '.join(COMPILE_MODES)} (or true/false)", self.compile)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding for generation tasks (summarization)."""

    max_new_tokens: int = 48  # longest generated summary, in tokens
    num_beams: int = 1  # 1: greedy
    # {document} is replaced by the (possibly truncated) input text.
    prompt: str = "Summarize the following text in one sentence.\n\n{document}\n\nSummary:"

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", "a positive integer",
               self.max_new_tokens)
        _check(self.num_beams >= 1, "generation.num_beams", "a positive integer", self.num_beams)
        _check("{document}" in self.prompt, "generation.prompt", "a template containing "
               "{document}", self.prompt)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output_dir: str = ""  # empty: runs/<task>-<dataset>-<model>-<method>
    overwrite: bool = False  # allow reusing an output folder that holds another run

    def __post_init__(self) -> None:
        if self.train.early_stopping_patience and not self.data.selection_examples:
            raise ConfigError("train.early_stopping_patience needs a selection split to stop "
                              "on (data.selection_examples > 0): stopping on dev would select "
                              "on the set the result is reported on")

    @property
    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        model = Path(self.model.name).name or self.model.name
        dataset = Path(self.data.dataset).name
        return Path("runs") / f"{self.data.task}-{dataset}-{model}-{self.method.name}"

    def replace(self, **sections: Mapping[str, Any] | Any) -> "RunConfig":
        """A copy with some fields changed: `cfg.replace(train={"lr": 1e-3}, output_dir="x")`."""
        return compose(self, sections)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Conversion from plain data (YAML, JSON, CLI) with strict checking.


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out))  # tuples become lists, as in YAML/JSON


def from_dict(data: Mapping[str, Any], cls: type = RunConfig, where: str = "") -> Any:
    """Build `cls` from nested plain data, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        moved = [f" ({prefix}{k} is now {MOVED[prefix + k]})" for k in unknown
                 if prefix + k in MOVED]
        raise ConfigError(
            f"unknown config key {', '.join(prefix + k for k in unknown)}{''.join(moved)}; "
            f"known keys{' of ' + where if where else ''}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], path)
    return cls(**kwargs)


def _is_rate(text: str) -> bool:
    try:
        return 0 <= float(text) < 1
    except ValueError:
        return False


def _coerce(value: Any, hint: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(value, hint, path)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint in (int, float):
        expected = "an integer" if hint is int else "a number"
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected {expected}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected {expected}, got {value!r}")
        if hint is int:
            if not float(value).is_integer():
                raise ConfigError(f"{path}: expected {expected}, got {value!r}")
            value = int(value)
        return hint(value)
    if hint is str:
        if path in ON_OFF and (isinstance(value, bool) or str(value).lower() in (
                "true", "false")):  # a former boolean: true/false still mean on/off
            return "on" if value is True or str(value).lower() == "true" else "off"
        if isinstance(value, Mapping):  # a YAML mapping for a JSON field (method.peft.config)
            return json.dumps(value, sort_keys=True)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such fields today
        return value
    return value


# Fields that moved into a method's own section, and where they live now. A stored config of an
# older version (an adapter's adaptune.json, a run's config.json, a sweep record) is upgraded
# with `upgrade_stored`; in a user's YAML or override the old name is an error that says the new.
MOVED = {f"method.{k}": f"method.adalora.{k}"
         for k in ("init_rank", "tinit", "tfinal", "delta_t", "orth_reg_weight")}


COMPILE_MODES = ("off", "on", "auto")
ON_OFF = {"train.compile"}  # string fields that were booleans: true/false read as on/off


def upgrade_stored(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config (plain data) of an older adaptune in today's layout."""
    out = json.loads(json.dumps(data))
    model = out.get("model")
    if isinstance(model, dict):  # before model.dropout, the backbone kept its checkpoint's
        model.setdefault("dropout", "checkpoint")
    train = out.get("train")
    if isinstance(train, dict) and isinstance(train.get("compile"), bool):
        train["compile"] = "on" if train["compile"] else "off"
    method = out.get("method")
    if isinstance(method, dict):
        for old, new in MOVED.items():
            key = old.split(".", 1)[1]
            if key in method:
                method.setdefault("adalora", {})[new.rsplit(".", 1)[1]] = method.pop(key)
    return out


def merge_dicts(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain data with `changes` applied: sections merge field by field, other values
    are replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        elif dataclasses.is_dataclass(value):
            out[key] = to_dict(value)
        else:
            out[key] = value
    return out


def compose(*layers: Mapping[str, Any] | RunConfig | None, yaml_path: str | Path | None = None,
            overrides: Sequence[str] = ()) -> RunConfig:
    """The one way a run's config is put together, used by recipes, the API, the sweep and the
    domain stages: defaults < each layer in order (a preset, a grid's settings, an API call's
    changes: nested dicts or whole RunConfigs) < a YAML file < `section.field=value` overrides.
    Every layer only replaces fields; an unknown key or a bad value is an error naming it."""
    data = to_dict(RunConfig())
    for layer in layers:
        if layer is not None:
            data = merge_dicts(data, to_dict(layer) if isinstance(layer, RunConfig) else layer)
    if layers:
        from_dict(data)  # a bad preset or layer is reported before the YAML is read
    if yaml_path:
        data = merge_dicts(data, _read_yaml(Path(yaml_path), data))
    return from_dict(merge_dicts(data, parse_overrides(overrides)))


def _read_yaml(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}, {exc}") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        from_dict(merge_dicts(data, loaded))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return loaded


def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last
    silently, dropping a whole earlier section)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given "
                                  f"twice in one section (first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "method.targets=query,value"]` -> nested dict (values stay strings;
    `from_dict` converts them by the field's type and reports bad ones by name)."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.field=value, "
                              "e.g. train.lr=1e-3")
        node = nested
        *parents, leaf = key.lstrip("-").split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a field, not a section")
        node[leaf] = value
    return nested


def load_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = (),
                base: RunConfig | None = None) -> RunConfig:
    """Defaults (or `base`), then a YAML file, then `section.field=value` overrides."""
    return compose(base, yaml_path=yaml_path, overrides=overrides)


def _check(ok: bool, field_name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: expected {expected}, got {got!r}")


# ----------------------------------------------------------------------------------------------
# A description of every field, for `--help`: generated from the dataclasses themselves (type,
# default) and the comments beside or above each field in this file (its meaning), so the help
# cannot drift from the defaults.


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(path, type, default, meaning) for every field of RunConfig, sections expanded."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        notes = _field_comments(cls)
        default = cls()
        for f in fields(cls):
            path = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], path + ".")
                continue
            value = getattr(default, f.name)
            shown = ",".join(value) if isinstance(value, tuple) else json.dumps(value)
            rows.append((path, _type_name(hints[f.name]), shown, notes.get(f.name, "")))

    walk(RunConfig, "")
    return rows


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "list"
    return getattr(hint, "__name__", str(hint))


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the comment on its line, else the comment lines right above it}."""
    import inspect
    import re
    import textwrap

    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):  # pragma: no cover - no source (frozen app)
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if match and not stripped.startswith(("def ", "@", "return")):
            out[match.group(1)] = (match.group(2) or " ".join(above)).strip()
        above = []
    return out


def help_text() -> str:
    """Every config field as `--help` shows it."""
    rows = describe_fields()
    width = max(len(path) for path, *_ in rows)
    lines = ["config fields (section.field=value; defaults < preset < --config YAML < these):"]
    for path, kind, default, meaning in rows:
        first = meaning.split(". ")[0].rstrip(".")  # the first sentence; the file has the rest
        lines.append(f"  {path:<{width}}  {kind:<5} {default[:30]:<12} {first}")
    return "\n".join(lines)


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
