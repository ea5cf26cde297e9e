"""Export a trained adapter as an ordinary transformers model folder (or ONNX), usable with no
adaptune import: `transformers.pipeline(task, model=OUT)`, `AutoModelFor*.from_pretrained(OUT)`.

The adapter is merged into the base weights, then the backbone and the head are written as the
standard class that computes the same function:

    ner             *ForTokenClassification   (dropout + linear on every token: our TokenHead)
    qa              *ForQuestionAnswering      (a linear to start/end logits: our SpanHead)
    classification  *ForSequenceClassification, for heads trained with model.pooling=pooler
                    (BERT's dense + tanh on the first token). The default mean-pooling head has
                    no transformers class: it is refused with that advice rather than exported
                    as custom code, which would need trust_remote_code=True to load.
    summarization   the causal LM itself (*ForCausalLM)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adaptune.errors import ConfigError

AUTO_CLASSES = {"ner": "AutoModelForTokenClassification",
                "qa": "AutoModelForQuestionAnswering",
                "classification": "AutoModelForSequenceClassification"}
PIPELINES = {"ner": "token-classification", "classification": "text-classification",
             "summarization": "text-generation"}


def export_transformers(adapter_dir: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write the merged model as a transformers folder at `out`; returns (out, what was
    written, as one line for the user)."""
    import transformers

    from adaptune.api import load

    predictor = load(adapter_dir, merge=True)
    task, model, meta = predictor.meta.task, predictor.model, predictor.meta
    out = Path(out)
    backbone, head = model.backbone, model.task_head
    if task == "summarization":
        backbone.save_pretrained(out, safe_serialization=True)
        predictor.tokenizer.save_pretrained(out)
        return out, f"{out}: {type(backbone).__name__} (the merged causal LM) and its tokenizer"
    if task not in AUTO_CLASSES:
        raise ConfigError(f"export: the {task} task has no transformers model class to export to")
    from adaptune.tasks.classification import PoolerHead

    if task == "classification" and not isinstance(head, PoolerHead):
        raise ConfigError(
            "export: this classifier mean-pools the tokens, which no transformers "
            "*ForSequenceClassification class does; retrain it with model.pooling=pooler "
            "(BERT's first-token pooler, exported as the standard class), or use "
            "adaptune.load(...) / export --to onnx, which keep the head as trained")
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.architectures = None
    if task != "qa":  # QA's two outputs (start, end) are not labels
        config.num_labels = len(meta.labels)
        config.id2label = dict(enumerate(meta.labels))
        config.label2id = {label: i for i, label in enumerate(meta.labels)}
    standard = getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    body = getattr(standard, standard.base_model_prefix)
    missing, unexpected = body.load_state_dict(backbone.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # the pooler: from the head
    if missing or unexpected:
        raise ConfigError(f"export: the backbone does not fit {type(standard).__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        _copy_head(task, head, standard, body)
    standard.save_pretrained(out, safe_serialization=True)
    predictor.tokenizer.save_pretrained(out)
    how = (f"transformers.{AUTO_CLASSES[task]}.from_pretrained('{out}') (transformers 5 has no "
           "question-answering pipeline)" if task == "qa" else
           f"transformers.pipeline('{PIPELINES[task]}', model='{out}')")
    labels = f"; labels {', '.join(meta.labels)}" if meta.labels else ""
    return out, (f"{out}: {type(standard).__name__} (adapter merged{labels}) and its tokenizer; "
                 f"load it with {how}")


def _copy_head(task: str, head: Any, standard: Any, body: Any) -> None:
    if task == "ner":
        standard.classifier.load_state_dict(head.classifier.state_dict())
    elif task == "qa":
        standard.qa_outputs.load_state_dict(head.qa_outputs.state_dict())
    else:
        if getattr(body, "pooler", None) is None:
            raise ConfigError(f"export: {type(body).__name__} has no pooler to take the "
                              "trained first-token pooler")
        body.pooler.dense.load_state_dict(head.pooler[0].state_dict())
        standard.classifier.load_state_dict(head.classifier.state_dict())


def export_onnx(adapter_dir: str | Path, out: str | Path, *, check: bool = True
                ) -> tuple[Path, str]:
    """The merged model (backbone and head, as trained) as one ONNX graph at `out`, logits
    out; with `check`, compared against PyTorch with onnxruntime on a sample batch."""
    from adaptune.api import load

    predictor = load(adapter_dir, merge=True)
    model = _LogitsOnly(predictor.model).eval()
    sample = predictor.tokenizer(["a short sample sentence", "and a second, longer one here"],
                                 padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]
    inputs = tuple(sample[k] for k in names)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {k: {0: "batch", 1: "sequence"} for k in names}
    torch.onnx.export(model, inputs, str(out), input_names=names, output_names=["logits"],
                      dynamic_axes=dynamic, dynamo=False, opset_version=17)
    if not check:
        return out, f"{out}: ONNX graph (not checked)"
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out))
    got = session.run(None, {k: sample[k].numpy() for k in names})[0]
    with torch.no_grad():
        expected = model(*inputs).numpy()
    gap = float(np.abs(got - expected).max())
    if gap > 1e-4:
        raise ConfigError(f"export: the ONNX graph differs from PyTorch by {gap:.2e} (> 1e-4)")
    return out, f"{out}: ONNX graph of the merged model, logits within {gap:.1e} of PyTorch"


class _LogitsOnly(torch.nn.Module):
    """The task model with positional inputs and its logits as one tensor (ONNX wants both)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        logits = self.model(**batch).logits
        return torch.stack(logits, -1) if isinstance(logits, (tuple, list)) else logits
