"""The one inference loop, shared by dev-set evaluation during training and by `Predictor`.

Features are batched by length (little padding), run without gradients, and every prediction
is put back at its feature's position, so callers see them in feature order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptune.batching import eval_batches
from adaptune.tasks import Task


@torch.no_grad()
def predict_features(model: nn.Module, task: Task, features: list[dict], tokenizer: Any,
                     batch_size: int, device: torch.device | str | None = None) -> list[Any]:
    """One prediction per feature, in feature order."""
    model.eval()
    device = device or next(model.parameters()).device  # a quantized base lives on the GPU
    predictions: list[Any] = [None] * len(features)
    lengths = [len(f["input_ids"]) for f in features]
    for indices in eval_batches(lengths, batch_size):
        batch = task.collate([features[i] for i in indices], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        for i, prediction in zip(indices, task.predict(model, batch, tokenizer)):
            predictions[i] = prediction
    return predictions


def evaluate(model: nn.Module, task: Task, examples: list, features: list[dict],
             labels: list[str], tokenizer: Any, batch_size: int,
             device: torch.device | str | None = None, *, with_stats: bool = False
             ) -> dict[str, float] | tuple[dict[str, float], list[list[float]]]:
    """The task's metrics of `model` on encoded examples; with `with_stats`, also the
    per-example statistics of the main metric (`Task.example_stats`), which a report
    resamples to measure the dev set's own sampling noise."""
    predictions = predict_features(model, task, features, tokenizer, batch_size, device)
    metrics = task.score(examples, features, predictions, labels)
    if not with_stats:
        return metrics
    return metrics, task.example_stats(examples, features, predictions, labels)
