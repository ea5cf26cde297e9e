"""Abstractive summarization with a decoder-only model (GPT family).

Prepare: JSON lines from XSum, SciTLDR (several reference TLDRs per paper), DialogSum and
Multi-LexSum. Encode: `generation.prompt` with the document (truncated so prompt + summary fit
`model.max_length`), then the summary and EOS; the loss counts only the summary tokens.
Head: the backbone's own LM output layer (no new parameters). Decode: greedy or beam search up to
`generation.max_new_tokens`. Metrics: ROUGE-1/2/L F1 x 100 from the `rouge-score` package with
stemming, best over the references of each example (its `score_multi`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune.config import DataConfig, GenerationConfig, RunConfig
from adaptune.data import DatasetSpec, read_jsonl_rows
from adaptune.errors import ConfigError, DataError
from adaptune.modeling import CausalLMHead
from adaptune.spec import Family, ModelSpec
from adaptune.tasks import Task

MAX_SUMMARY_TOKENS = 96  # training targets longer than this are cut


@dataclass(frozen=True)
class Example:
    id: str
    document: str
    references: tuple[str, ...]  # empty for prediction inputs


DATASETS = {
    "xsum": DatasetSpec("summ/xsum/validation_1000.jsonl", "", "xsum",
                        note="1,000 validation documents: fixed 80/10/10 split"),
    "scitldr": DatasetSpec("summ/scitldr/train.jsonl", "summ/scitldr/dev.jsonl", "scitldr"),
    "dialogsum": DatasetSpec("summ/dialogsum/dev.jsonl", "summ/dialogsum/test.jsonl", "dialogsum",
                             note="train = dev file, dev = test file (3 references)"),
    "multilexsum": DatasetSpec("summ/multilexsum/test.jsonl", "", "multilexsum",
                               note="fixed 80/10/10 split of the test file"),
}


# ---------------------------------------------------------------------------------------------
# Prepare data.


def _fields(row: dict, reader: str) -> tuple[str, str, list[str]]:
    """(id, document, references) from one JSON line of each format."""
    if reader == "scitldr":
        return str(row["paper_id"]), " ".join(row["source"]), list(row["target"])
    if reader == "dialogsum":
        refs = [row[k] for k in ("summary", "summary1", "summary2", "summary3") if k in row]
        return str(row["fname"]), row["dialogue"], refs
    return str(row.get("id", "")), row["document"], [row["summary"]]


def read_jsonl(path: Path, reader: str) -> list[Example]:
    """Examples of one file. An empty summary target is an error; an empty *document* (the real
    XSum file has one) is skipped with a warning, since there is nothing to summarize."""
    examples = []
    skipped: list[str] = []
    for number, row in read_jsonl_rows(path):
        try:
            qid, document, refs = _fields(row, reader)
        except (KeyError, TypeError) as exc:
            raise DataError(f"missing field {exc} for the {reader} format", path, number) \
                from None
        qid = qid or f"line{number}"
        if not str(document).strip():
            skipped.append(f"line {number} (id {qid})")
            continue
        if not refs or any(not str(r).strip() for r in refs):
            raise DataError(f"id {qid}: empty summary target", path, number)
        examples.append(Example(qid, str(document), tuple(str(r).strip() for r in refs)))
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} example(s) with an empty document: "
                      + ", ".join(skipped[:5]), stacklevel=2)
    return examples


@dataclass
class SummarizationTask(Task):
    """Options: how to prompt and decode (`generation.*`)."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name, main_metric, metric_scale = "summarization", "rougeL", 100.0
    datasets, default_dataset = DATASETS, "xsum"
    lm_head = True
    generates = True
    packable = False  # prediction is not one forward pass without the targets

    @classmethod
    def from_config(cls, config: RunConfig) -> "SummarizationTask":
        return cls(config.generation)

    def read(self, path: Path, cfg: DataConfig, spec: DatasetSpec | None) -> list[Example]:
        return read_jsonl(path, spec.reader if spec else "xsum")

    def corpus_text(self, example: Example) -> str:
        return example.document  # not the summary: that is the label

    def table_fields(self, cfg: DataConfig) -> list[str]:
        return [cfg.document_field, cfg.summary_field]

    def from_rows(self, rows: list[dict], features: Any, cfg: DataConfig, path: Path
                  ) -> list[Example]:
        out = []
        for number, row in enumerate(rows, start=1):
            document, summary = row[cfg.document_field], row[cfg.summary_field]
            references = tuple(summary) if isinstance(summary, list) else (summary,)
            if not isinstance(document, str) or not document.strip() or not all(
                    isinstance(r, str) and r.strip() for r in references):
                raise DataError(f"columns {cfg.document_field!r} and {cfg.summary_field!r}: "
                                "expected a non-empty document and summary", path, number)
            out.append(Example(str(row.get("id", number)), document, references))
        return out

    def check(self, model: ModelSpec) -> None:
        if model.family is not Family.DECODER:
            raise ConfigError("summarization runs decoder-only (GPT-family) models; got an "
                              "encoder. Use e.g. model.name=smollm2-135m")

    def encode(self, examples: list[Example], tokenizer: Any, labels: list[str],
               max_length: int, split: str) -> list[dict]:
        """`generation.prompt` around the document (masked out of the loss), then, for
        training, the summary and EOS."""
        template = self.generation.prompt
        before, after = template.split("{document}", 1)
        pre = tokenizer(before, add_special_tokens=False)["input_ids"]
        post = tokenizer(after, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        training = split == "train"
        features = []
        for i, ex in enumerate(examples):
            target = []
            if training:
                target = tokenizer(" " + ex.references[0], add_special_tokens=False)["input_ids"]
                target = target[:MAX_SUMMARY_TOKENS] + [tokenizer.eos_token_id]
            reserve = len(target) if training else self.generation.max_new_tokens
            budget = max_length - len(bos) - len(pre) - len(post) - reserve
            if budget < 16:
                raise ConfigError(f"model.max_length {max_length} leaves {budget} tokens for the "
                                  "document after the prompt and summary; raise it")
            doc = tokenizer(ex.document, add_special_tokens=False)["input_ids"][:budget]
            prompt = bos + pre + doc + post
            ids = prompt + target
            feature = {"input_ids": ids, "attention_mask": [1] * len(ids), "_example": i}
            if training:
                feature["labels"] = [-100] * len(prompt) + target
            features.append(feature)
        return features

    def build_head(self, hidden_size: int, labels: list[str], model: ModelSpec,
                   backbone_config: Any = None) -> nn.Module:
        return CausalLMHead()  # the language-model output the backbone already has

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor],
                tokenizer: Any) -> list[str]:
        """Generated text per row. Rows arrive right-padded; generation needs left padding."""
        lm = _backbone(model)
        lengths = batch["attention_mask"].sum(1)
        width = int(lengths.max())
        pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
        ids = torch.full((len(lengths), width), pad, dtype=batch["input_ids"].dtype,
                         device=batch["input_ids"].device)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths.tolist()):
            ids[row, width - n:] = batch["input_ids"][row, :n]
            mask[row, width - n:] = 1
        out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                          num_beams=self.generation.num_beams,
                          max_new_tokens=self.generation.max_new_tokens, pad_token_id=pad)
        return [text.strip() for text in
                tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]

    def score(self, examples: list[Example], features: list[dict], predictions: list[str],
              labels: list[str]) -> dict[str, float]:
        return rouge(self.decode(examples, features, predictions, labels),
                     [ex.references for ex in examples])

    def example_stats(self, examples: list[Example], features: list[dict],
                      predictions: list[str], labels: list[str]) -> list[list[float]]:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        texts = self.decode(examples, features, predictions, labels)
        return [[100.0 * scorer.score_multi(list(ex.references), text)["rougeL"].fmeasure]
                for ex, text in zip(examples, texts)]

    def make_examples(self, inputs: list[str]) -> list[Example]:
        return [Example(str(i), text, ()) for i, text in enumerate(inputs)]


def _backbone(model: nn.Module) -> nn.Module:
    """The causal LM inside a TaskModel, with any LoRA layers peft injected into it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.backbone


def rouge(predictions: list[str], references: list[tuple[str, ...]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100; for several references, the best per example."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(list(refs), pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}
