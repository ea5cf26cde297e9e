"""Task registry. Every task module has the same shape and exports one `TASK`:

    load(data_cfg, split, seed)            -> examples (train or dev), validated
    label_space(train, dev, path)          -> label names (empty for label-free tasks)
    encode(examples, tokenizer, labels, max_length, split, config) -> features (plain dicts)
    collate(features, pad_id)              -> a batch of tensors
    build_head(hidden_size, labels, family, backbone_config) -> the head ("task_head.*" parameters)
    predict(model, batch, config, tokenizer) -> one prediction per feature
    score(examples, features, predictions, labels) -> metrics
    decode(examples, features, predictions, labels) -> one output per example (for users)
    make_examples(raw inputs)              -> examples without gold labels (for prediction)
    check(config, family)                  -> raises if the task cannot use this model

so the training flow treats all of them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from adaptune.errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    main_metric: str  # higher is better
    load: Callable[..., list]
    label_space: Callable[..., list[str]]
    encode: Callable[..., list[dict]]
    collate: Callable[..., dict[str, Any]]
    build_head: Callable[..., Any]
    predict: Callable[..., list]
    score: Callable[..., dict[str, float]]
    decode: Callable[..., list]
    make_examples: Callable[..., list]
    datasets: dict[str, Any] = field(default_factory=dict)
    lm_head: bool = False  # the backbone keeps its LM output layer (generation tasks)
    higher_is_better: bool = True  # of main_metric (perplexity: lower is better)
    # (run config, model family) -> None; raises ConfigError for a model the task cannot use
    check: Callable[..., None] = lambda config, family: None
    default_dataset: str = ""


def no_labels(train: list, dev: list) -> list[str]:
    """label_space of the tasks without a label set (QA, summarization, language modelling)."""
    return []


# Task name -> module; imported on first use so that a task's dependencies load only when needed.
TASK_MODULES = {
    "classification": "adaptune.tasks.classification",
    "ner": "adaptune.tasks.ner",
    "qa": "adaptune.tasks.qa",
    "summarization": "adaptune.tasks.summarization",
    "lm": "adaptune.tasks.lm",
}


def get_task(name: str) -> Task:
    import importlib

    if name not in TASK_MODULES:
        raise ConfigError(f"data.task: unknown task {name!r}; known: {', '.join(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK
