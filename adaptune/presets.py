"""Presets: the named starting points of the recipes, the domain stages and the benchmarks.

A preset is a partial config (nested plain data) over the defaults in `adaptune.config`; it
states only what differs. `extends(parent, changes)` builds one preset from another, so a
sibling recipe says only how it differs from its parent. `config(name)` composes a preset with
the defaults; recipes add a YAML file and overrides on top through `adaptune.config.compose`.
"""

from __future__ import annotations

from typing import Any, Mapping

from adaptune.config import RunConfig, compose, merge_dicts

# LoRA on every attention matrix and the attention output (BERT-style names).
ENCODER_LORA = {"name": "lora", "rank": 8, "targets": ["query", "key", "value", "dense"]}


def extends(parent: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`parent` with `changes` applied section by section."""
    return merge_dicts(parent, changes)


NER_LORA = {
    "model": {"name": "minilm-l6", "max_length": 128},
    "data": {"task": "ner", "dataset": "conll2003"},
    "method": ENCODER_LORA,
    "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3},
    "output_dir": "runs/ner_lora",
}
CLS_LORA = {
    "model": {"name": "minilm-l6", "max_length": 64},
    "data": {"task": "classification", "dataset": "sst2", "max_train_examples": 20000},
    "method": ENCODER_LORA,
    "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
    "output_dir": "runs/cls_lora",
}

# Domain adaptation: the domain stage (masked / causal LM on in-domain text) and the task stage
# that follows it. Shared by recipes/domain_ner.py, adaptune.domain and the benchmark.
DOMAIN_STAGE = {
    "model": {"max_length": 128},
    "method": ENCODER_LORA,
    "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
}
DOMAIN_TASK = {
    "model": {"max_length": 128},
    "method": ENCODER_LORA,
    "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
}

PRESETS: dict[str, dict[str, Any]] = {
    "ner_lora": NER_LORA,
    # AdaLoRA as in its paper: initial rank 1.5x the target, every attention and feed-forward
    # matrix.
    "ner_adalora": extends(NER_LORA, {
        "method": {"name": "adalora", "targets": ["all-linear"],
                   "adalora": {"init_rank": 12}},
        "output_dir": "runs/ner_adalora"}),
    "cls_lora": CLS_LORA,
    "cls_bitfit": extends(CLS_LORA, {"method": {"name": "bitfit", "targets": []},
                                     "train": {"lr": 2e-3}, "output_dir": "runs/cls_bitfit"}),
    "qa_lora": {
        "model": {"name": "minilm-l6", "max_length": 256},
        "data": {"task": "qa", "dataset": "squad_v2_dev_part"},
        "method": ENCODER_LORA,
        "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "eval_batch_size": 64},
        "output_dir": "runs/qa_lora",
    },
    "summarize_lora": {
        "model": {"name": "smollm2-135m", "max_length": 384},
        "data": {"task": "summarization", "dataset": "xsum", "max_dev_examples": 50},
        "method": {"name": "lora", "rank": 8,
                   "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-4, "eval_batch_size": 16},
        "generation": {"max_new_tokens": 40, "num_beams": 1},
        "output_dir": "runs/summarize_lora",
    },
}


def config(name: str) -> RunConfig:
    """The preset `name` over the defaults."""
    return compose(PRESETS[name])
