"""Tasks: one module per task, each a subclass of `Task` that states only what differs.

`Task` supplies the shared skeleton -- loading a split (named data set or the user's files, the
fixed 80/10/10 split of single-file sets, the seeded subset), the model inputs of a tokenizer's
output, argmax prediction, decoding predictions back to examples -- and a task fills in:

    read(path, cfg, spec)                      -> examples of one file, validated
    label_space(train, dev)                    -> label names (empty for label-free tasks)
    encode(examples, tokenizer, labels, max_length, split) -> features (plain dicts)
    build_head(hidden_size, labels, model, backbone_config) -> the head ("task_head.*")
    predict(model, batch, tokenizer)           -> one prediction per feature
    score(examples, features, predictions, labels) -> metrics
    make_examples(raw inputs)                  -> examples without gold labels (prediction)
    check(model)                               -> raises if the task cannot use this model

A task instance holds its own options (summarization its generation settings, language
modelling its objective and seed): `build_task(config)` is the one place they are read from a
RunConfig, so tasks never see the whole config.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from adaptune.config import DataConfig, RunConfig
from adaptune.data import (DatasetSpec, datasets_format, pad_collate, read_table,
                           require_nonempty, split_paths,
                           split_single_file, take_subset)
from adaptune.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.spec import ModelSpec

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Task:
    name: ClassVar[str]
    main_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True  # of main_metric (perplexity: lower is better)
    metric_scale: ClassVar[float] = 1.0  # main_metric's best value (100 for QA F1, ROUGE)
    lm_head: ClassVar[bool] = False  # the backbone keeps its LM output layer (generation)
    generates: ClassVar[bool] = False  # `predict` generates text (beyond one forward pass)
    datasets: ClassVar[dict[str, DatasetSpec]] = {}
    default_dataset: ClassVar[str] = ""
    target_keys: ClassVar[tuple[str, ...]] = ("labels",)  # batch fields that are gold targets
    # Several adapters can train in one pack (adaptune.packing): `predict` is one forward pass
    # of the model on the batch without its targets.
    packable: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: RunConfig) -> "Task":
        """The task with its options taken from a run config (none, by default)."""
        return cls()

    # -- data ---------------------------------------------------------------------------------

    def load(self, cfg: DataConfig, split: str, seed: int) -> list:
        """The examples of one split ("train", "dev", or "selection": carved from train): the
        user's file if given, else the named data set's; split if the set has one file; subset
        as configured."""
        named = self.datasets.get(cfg.dataset)
        source = "dev" if split == "dev" else "train"
        path = split_paths(cfg, named)[source]
        explicit = cfg.train_path if source == "train" else cfg.dev_path
        spec = None if explicit else named
        if datasets_format(path, cfg):  # a parquet/arrow/save_to_disk table, or data.format
            rows, features = read_table(path, cfg, self.table_fields(cfg))
            examples = self.from_rows(rows, features, cfg, path)
        else:
            examples = self.read(path, cfg, spec)
        examples = self.split(examples, source, spec)
        examples = take_subset(examples, cfg, seed, split)
        require_nonempty(examples, path, split)
        return examples

    def read(self, path: Path, cfg: DataConfig, spec: DatasetSpec | None) -> list:
        """Every example of one file (`spec` is the named set's entry, None for a user file)."""
        raise NotImplementedError

    def table_fields(self, cfg: DataConfig) -> list[str]:
        """The columns a `datasets` table must have for this task."""
        raise ConfigError(f"the {self.name} task does not read datasets tables; give a file of "
                          "its own format")

    def from_rows(self, rows: list[dict], features: Any, cfg: DataConfig, path: Path) -> list:
        """Examples from the rows of a `datasets` table (`features` names ClassLabel ids)."""
        raise NotImplementedError

    def split(self, examples: list, split: str, spec: DatasetSpec | None) -> list:
        """A named set that ships one file is split 80/10/10 with a fixed seed."""
        if spec is not None and not spec.dev:
            return split_single_file(examples, split)
        return examples

    def label_space(self, train: list, dev: list) -> list[str]:
        return []

    def corpus_text(self, example: Any) -> str:
        """An example's text with its labels stripped: what task-adaptive pretraining (TAPT)
        reads from the training split."""
        raise ConfigError(f"the {self.name} task has no text to pretrain on (TAPT)")

    def check(self, model: "ModelSpec") -> None:
        """Raise ConfigError if the task cannot use this model."""

    # -- features -------------------------------------------------------------------------------

    def encode(self, examples: list, tokenizer: Any, labels: list[str], max_length: int,
               split: str) -> list[dict]:
        raise NotImplementedError

    def collate(self, features: Sequence[dict], pad_id: int) -> dict[str, Any]:
        return pad_collate(features, pad_id)

    # -- model ----------------------------------------------------------------------------------

    def build_head(self, hidden_size: int, labels: list[str], model: "ModelSpec",
                   backbone_config: Any) -> "nn.Module":
        raise NotImplementedError

    def predict(self, model: "nn.Module", batch: dict[str, "torch.Tensor"],
                tokenizer: Any) -> list:
        """Default: the argmax of the head's logits (per example or per token)."""
        inputs = {k: v for k, v in batch.items() if k not in self.target_keys}
        return model(**inputs).logits.argmax(-1).tolist()

    # -- outputs --------------------------------------------------------------------------------

    def score(self, examples: list, features: list[dict], predictions: list,
              labels: list[str]) -> dict[str, float]:
        raise NotImplementedError

    def example_stats(self, examples: list, features: list[dict], predictions: list,
                      labels: list[str]) -> list[list[float]]:
        """Per dev example, additive statistics whose column sums give the main metric through
        `metric_from_stats`: what a bootstrap over the dev set resamples. Default: the
        example's own score (classification, QA and summarization average them)."""
        raise NotImplementedError

    def metric_from_stats(self, sums: Sequence[float], n: int) -> float:
        """The main metric from column sums of `example_stats` over n examples."""
        return float(sums[0]) / max(1, n)

    def decode(self, examples: list, features: list[dict], predictions: list,
               labels: list[str]) -> list:
        """One output per example, for users: each feature's prediction goes to its example
        (`output` turns it into what a user sees)."""
        out: list[Any] = [None] * len(examples)
        for feature, prediction in zip(features, predictions):
            out[feature["_example"]] = self.output(prediction, labels)
        return out

    def output(self, prediction: Any, labels: list[str]) -> Any:
        return prediction

    def make_examples(self, inputs: Sequence[Any]) -> list:
        raise NotImplementedError


def model_inputs(encoding: Any, i: int) -> dict[str, list[int]]:
    """Row `i` of a tokenizer's batch output, as a feature's model inputs."""
    return {key: encoding[key][i] for key in MODEL_INPUTS if key in encoding}


# Task name -> "module:Class"; imported on first use so that a task's dependencies load only
# when needed.
TASKS = {
    "classification": "adaptune.tasks.classification:ClassificationTask",
    "ner": "adaptune.tasks.ner:NerTask",
    "qa": "adaptune.tasks.qa:QaTask",
    "summarization": "adaptune.tasks.summarization:SummarizationTask",
    "lm": "adaptune.tasks.lm:LanguageModelTask",
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"data.task: unknown task {name!r}; known: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(config: RunConfig) -> Task:
    return task_class(config.data.task).from_config(config)
