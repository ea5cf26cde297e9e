"""The Python API: fine-tune, then predict.

    import adaptune
    result = adaptune.finetune("minilm-l6", task="classification", dataset="sst2",
                               method="lora", rank=8, output_dir="runs/sst2")
    print(result.metrics["dev"])
    model = adaptune.load(result.adapter_dir)
    model.predict(["a gripping, beautiful film", "a tedious mess"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from adaptune.config import RunConfig, from_dict, to_dict
from adaptune.errors import ModelError
from adaptune.methods import get_method, load_trained, merged
from adaptune.safe_io import verify_checksums
from adaptune.tasks import get_task
from adaptune.train import META_FILE, RunResult, build_task_model, load_tokenizer, run

# Shortcuts accepted by `finetune`, mapped to their config section.
_SHORTCUTS = {"rank": "method", "alpha": "method", "targets": "method", "epochs": "train",
              "lr": "train", "batch_size": "train", "max_steps": "train", "seed": "train",
              "precision": "train", "max_train_examples": "data", "max_dev_examples": "data",
              "train_path": "data", "dev_path": "data", "train_fraction": "data",
              "max_length": "model", "dropout": "method", "group_by_length": "train"}


def finetune(model: str = "minilm-l6", *, task: str = "classification", dataset: str = "",
             method: str = "lora", output_dir: str = "", config: RunConfig | None = None,
             **overrides: Any) -> RunResult:
    """Fine-tune `model` on `task`/`dataset` with `method`. Keyword overrides are config fields,
    either as shortcuts (`rank=16`, `lr=1e-3`, `epochs=2`) or whole sections
    (`train={"lr": 1e-3}`)."""
    base = to_dict(config or RunConfig())
    changes: dict[str, Any] = {"model": {"name": model}, "method": {"name": method},
                               "data": {"task": task}}
    if dataset:
        changes["data"]["dataset"] = dataset
    elif not config:
        changes["data"]["dataset"] = get_task(task).default_dataset
    if output_dir:
        changes["output_dir"] = output_dir
    for key, value in overrides.items():
        if key in _SHORTCUTS:
            changes.setdefault(_SHORTCUTS[key], {})[key] = value
        elif isinstance(value, dict):
            changes[key] = {**changes.get(key, {}), **value}
        else:
            changes[key] = value
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return run(from_dict(base))


class Predictor:
    """A trained model ready for prediction on new text."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.task = get_task(meta["task"])
        self.labels: list[str] = meta["labels"]
        self.config = from_dict(meta["config"])

    def predict(self, inputs: Sequence[Any], batch_size: int = 64) -> list[Any]:
        """Predictions for raw inputs (texts for classification, token lists for NER, ...)."""
        examples = self.task.make_examples(inputs) if hasattr(self.task, "make_examples") \
            else inputs
        features = self.task.encode(list(examples), self.tokenizer, self.labels,
                                    self.meta["max_length"], "predict", self.config)
        preds: list[Any] = []
        device = next(self.model.parameters()).device  # a quantized base lives on the GPU
        with torch.no_grad():
            for i in range(0, len(features), batch_size):
                batch = self.task.collate(features[i:i + batch_size], self.tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                preds += self.task.predict(self.model, batch, self.config, self.tokenizer)
        return self.task.decode(examples, features, preds, self.labels)


def load(adapter_dir: str | Path, *, merge: bool = False) -> Predictor:
    """Rebuild the base model named in the adapter's `adaptune.json`, put the trained state
    (head included) back on it, optionally merge LoRA into the weights."""
    folder = Path(adapter_dir)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ModelError(f"{folder}: not an adaptune adapter folder (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    verify_checksums(folder, meta.get("sha256", {}))
    model = load_trained(build_base(meta), get_method(meta["method"]), folder)
    if merge:
        model = merged(model, get_method(meta["method"]))
    return Predictor(model, load_tokenizer(meta["model_path"]), meta)


def build_base(meta_or_folder: dict[str, Any] | str | Path) -> torch.nn.Module:
    """The un-adapted task model (pretrained backbone + freshly initialised head) that an adapter
    folder was trained on: hand it to `peft.PeftModel.from_pretrained(base, folder)`."""
    meta = meta_or_folder if isinstance(meta_or_folder, dict) else \
        json.loads((Path(meta_or_folder) / META_FILE).read_text())
    from adaptune import zoo

    path = zoo.resolve(meta["model"]) if meta["model"] in zoo.ZOO else meta["model_path"]
    tokenizer = load_tokenizer(path)
    return build_task_model(path, meta["family"], get_task(meta["task"]), meta["labels"],
                            tokenizer.pad_token_id,
                            meta.get("config", {}).get("model", {}).get("quantization", "none"))
