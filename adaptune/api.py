"""The Python API: fine-tune, then predict.

    import adaptune
    result = adaptune.finetune("minilm-l6", task="classification", dataset="sst2",
                               method="lora", rank=8, output_dir="runs/sst2")
    print(result.metrics["dev"])
    model = adaptune.load(result.adapter_dir)
    model.predict(["a gripping, beautiful film", "a tedious mess"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from adaptune.artifact import AdapterMeta, build_base, load_adapter
from adaptune.config import RunConfig, compose
from adaptune.inference import predict_features
from adaptune.tasks import Task, build_task, task_class
from adaptune.train import RunResult, run

__all__ = ["finetune", "finetune_config", "load", "build_base", "Predictor"]

# Shortcuts accepted by `finetune`: keyword -> the config field it sets. The model section's
# fields need one (`model` is the model's name there); its dropout is `backbone_dropout`, as
# `dropout` is LoRA's.
_SHORTCUTS = {
    **{key: f"method.{key}" for key in ("rank", "alpha", "targets", "dropout")},
    **{key: f"train.{key}" for key in ("epochs", "lr", "batch_size", "max_steps", "seed",
                                       "precision", "group_by_length")},
    **{key: f"data.{key}" for key in ("max_train_examples", "max_dev_examples", "train_path",
                                      "dev_path", "train_fraction")},
    **{key: f"model.{key}" for key in ("max_length", "attention", "quantization", "pooling")},
    "backbone_dropout": "model.dropout",
}


def finetune(model: str = "minilm-l6", *, task: str = "classification", dataset: Any = "",
             method: str = "lora", output_dir: str = "", config: RunConfig | None = None,
             dev_dataset: Any = None, **overrides: Any) -> RunResult:
    """Fine-tune `model` on `task`/`dataset` with `method`. `dataset` is a named set, or a
    `datasets.Dataset` (with `dev_dataset`) or `DatasetDict` (its "train" and "validation"
    splits), with columns named by the `data.*_field` settings. Keyword overrides are config
    fields, either as shortcuts (`rank=16`, `lr=1e-3`, `epochs=2`, `attention="eager"`,
    `backbone_dropout=0`: the list is `_SHORTCUTS`) or whole sections (`train={"lr": 1e-3}`;
    the model section only through its shortcuts, `model` being its name); `config` is a
    starting RunConfig (e.g. one with a method's own options:
    `compose({"method": {"name": "adalora", "adalora": {"tinit": 0.2}}})`)."""
    return run(finetune_config(model, task=task, dataset=dataset, method=method,
                               output_dir=output_dir, config=config, dev_dataset=dev_dataset,
                               **overrides))


def finetune_config(model: str = "minilm-l6", *, task: str = "classification",
                    dataset: Any = "", method: str = "lora", output_dir: str = "",
                    config: RunConfig | None = None, dev_dataset: Any = None,
                    **overrides: Any) -> RunConfig:
    """The RunConfig `finetune` would run with the same arguments, without running it (to
    inspect or save it, or to set a run up step by step)."""
    changes: dict[str, Any] = {"model": {"name": model}, "method": {"name": method},
                               "data": {"task": task}}
    if dataset is not None and not isinstance(dataset, str):
        train_path, dev_path = _tables_on_disk(dataset, dev_dataset)
        changes["data"].update(dataset="custom", format="disk", train_path=train_path,
                               dev_path=dev_path)
    elif dataset:
        changes["data"]["dataset"] = dataset
    elif not config:
        changes["data"]["dataset"] = task_class(task).default_dataset
    if output_dir:
        changes["output_dir"] = output_dir
    for key, value in overrides.items():
        if key in _SHORTCUTS:
            section, name = _SHORTCUTS[key].split(".")
            changes.setdefault(section, {})[name] = value
        elif isinstance(value, dict):
            changes[key] = {**changes.get(key, {}), **value}
        else:
            changes[key] = value
    return compose(config, changes)


def _tables_on_disk(dataset: Any, dev_dataset: Any) -> tuple[str, str]:
    """In-memory `datasets` tables as save_to_disk folders, so the run's config stays plain
    data (and resumable): under the cache, named by each table's content fingerprint, written
    once."""
    import datasets

    from adaptune.errors import ConfigError
    from adaptune.safe_io import atomic_dir
    from adaptune.zoo import cache_dir

    if isinstance(dataset, datasets.DatasetDict):
        dev_name = next((n for n in ("validation", "dev") if n in dataset), None)
        if "train" not in dataset or (dev_dataset is None and dev_name is None):
            raise ConfigError(f"finetune: a DatasetDict needs a 'train' and a 'validation' (or "
                              f"'dev') split; it has {list(dataset)} (a held-back test split "
                              "is never used: pass dev_dataset=...)")
        dataset, dev_dataset = dataset["train"], dev_dataset or dataset[dev_name]
    if not isinstance(dataset, datasets.Dataset) or not isinstance(dev_dataset,
                                                                    datasets.Dataset):
        raise ConfigError("finetune: dataset= takes a name, a datasets.Dataset (with "
                          "dev_dataset=) or a DatasetDict")
    paths = []
    for table in (dataset, dev_dataset):
        folder = cache_dir() / "datasets" / table._fingerprint
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(folder) as tmp:
                table.save_to_disk(str(tmp))
        paths.append(str(folder))
    return paths[0], paths[1]


class Predictor:
    """A trained model ready for prediction on new text."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, meta: AdapterMeta,
                 task: Task | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.task = task or build_task(meta.config)
        self.labels: list[str] = meta.labels
        # What merging into a quantized base changed (see `load`); None for any other load.
        self.merge_report: dict[str, Any] | None = None

    def predict(self, inputs: Sequence[Any], batch_size: int = 64) -> list[Any]:
        """Predictions for raw inputs (texts for classification, token lists for NER,
        (question, context) pairs for QA, documents for summarization)."""
        examples = self.task.make_examples(inputs)
        features = self.task.encode(list(examples), self.tokenizer, self.labels,
                                    self.meta.max_length, "predict")
        predictions = predict_features(self.model, self.task, features, self.tokenizer,
                                       batch_size)
        return self.task.decode(examples, features, predictions, self.labels)


def load(adapter_dir: str | Path, *, merge: bool = False, quantized_merge: str = "refuse",
         trusted: bool = False) -> Predictor:
    """Rebuild the base model named in the adapter's `adaptune.json`, put the trained state
    (head included) back on it, optionally merge the adapter into the weights. Every weights file
    is checked against its recorded checksum; `trusted=True` loads a folder that records none.

    On a 4/8-bit base, `merge=True` is refused unless `quantized_merge` is "dequantize" (a
    full-precision model: the de-quantized base plus the adapter) or "requantize" (that, quantized
    again); the error it adds, against the unmerged model, is in `Predictor.merge_report`."""
    loaded = load_adapter(Path(adapter_dir), merge=merge, quantized_merge=quantized_merge,
                          trusted=trusted)
    predictor = Predictor(loaded.model, loaded.tokenizer, loaded.meta, loaded.run.task)
    predictor.merge_report = loaded.merge_report
    return predictor
