"""Text classification: single sentences and sentence pairs.

Readers for the formats in the data root (SST-2 and other TSV with a header, AG News TSV
without one, Financial PhraseBank `sentence@label`, TREC `COARSE:fine question`, JSON lines, CSV).
Head: mean pooling and dropout 0.1 for encoders (the same on every model, pooler or not),
last-token pooling without dropout for decoders, then a linear classifier. Metrics: accuracy and
macro-F1.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune.config import DataConfig
from adaptune.data import DatasetSpec, class_names, read_jsonl_rows, read_lines
from adaptune.errors import ConfigError, DataError
from adaptune.modeling import TaskOutput, last_token_pool, mean_pool
from adaptune.spec import ModelSpec
from adaptune.tasks import Task, model_inputs


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None
    pair: str | None = None
    where: str = ""  # file:line, for error messages


# ---------------------------------------------------------------------------------------------
# Prepare data: readers.

DATASETS = {
    "sst2": DatasetSpec("cls/sst2/train.tsv", "cls/sst2/dev.tsv", "tsv"),
    "agnews": DatasetSpec("cls/agnews/dev.tsv", "cls/agnews/test.tsv", "tsv_noheader",
                          note="train = the 10k dev file (drawn from AG train), dev = test"),
    "trec": DatasetSpec("cls/trec/train_5500.label", "cls/trec/TREC_10.label", "trec",
                        encoding="latin-1"),
    "financial_phrasebank": DatasetSpec(
        "cls/financial_phrasebank/Sentences_50Agree.txt", "", "phrasebank", encoding="latin-1",
        note="no official split: 80/10/10 with a fixed seed"),
    "legal_unfair_tos": DatasetSpec("cls/legal_unfair_tos/data.tsv", "", "tsv",
                                    note="single file: 80/10/10 with a fixed seed"),
    "chemprot": DatasetSpec("cls/chemprot/train.jsonl", "cls/chemprot/dev.jsonl", "jsonl"),
}


def _fields(cfg: DataConfig) -> list[str]:
    """The columns a generic file must have: text, label, and the pair's text if any."""
    return [cfg.text_field, cfg.label_field] + ([cfg.text_pair_field] if cfg.text_pair_field
                                                 else [])


def _read_tsv(path: Path, cfg: DataConfig, encoding: str, header: bool = True,
              delimiter: str = "\t") -> list[Example]:
    lines = list(read_lines(path, encoding))
    if header:
        names = lines[0][1].rstrip("\r").split(delimiter)
        lines = lines[1:]
    else:
        names = [cfg.text_field, cfg.label_field]
    wanted = _fields(cfg)
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DataError(f"header has columns {names}; expected columns named {missing} "
                        "(set data.text_field / data.label_field)", path, 1)
    index = {n: i for i, n in enumerate(names)}
    out = []
    rows = csv.reader(io.StringIO("\n".join(text for _, text in lines)), delimiter=delimiter,
                      quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    for (number, _), row in zip(lines, rows):
        if not row:
            continue
        if len(row) != len(names):
            raise DataError(f"expected {len(names)} {'tab' if delimiter == chr(9) else 'comma'}-"
                            f"separated columns ({', '.join(names)}), found {len(row)}",
                            path, number)
        pair = row[index[cfg.text_pair_field]].strip() if cfg.text_pair_field else None
        out.append(Example(row[index[cfg.text_field]].strip(), row[index[cfg.label_field]].strip(),
                           pair, f"{path}:{number}"))
    return out


def _read_phrasebank(path: Path, cfg: DataConfig, encoding: str) -> list[Example]:
    out = []
    for number, line in read_lines(path, encoding):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("@")
        if not sep or not text.strip() or not label.strip():
            raise DataError("expected 'sentence@label'", path, number)
        out.append(Example(text.strip(), label.strip(), None, f"{path}:{number}"))
    return out


def _read_trec(path: Path, cfg: DataConfig, encoding: str) -> list[Example]:
    out = []
    for number, line in read_lines(path, encoding):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse, sep, _fine = tag.partition(":")
        if not sep or not question.strip():
            raise DataError("expected 'COARSE:fine question words'", path, number)
        out.append(Example(question.strip(), coarse, None, f"{path}:{number}"))
    return out


def _read_jsonl(path: Path, cfg: DataConfig, encoding: str) -> list[Example]:
    out = []
    fields = _fields(cfg)
    for number, row in read_jsonl_rows(path, encoding):
        if any(f not in row for f in fields):
            raise DataError(f"expected a JSON object with fields {fields}", path, number)
        empty = [f for f in fields if row[f] is None or isinstance(row[f], (dict, list, bool))]
        if empty:
            raise DataError(f"field {empty[0]!r} is {row[empty[0]]!r}, expected text", path,
                            number)
        out.append(Example(str(row[cfg.text_field]), str(row[cfg.label_field]),
                           str(row[cfg.text_pair_field]) if cfg.text_pair_field else None,
                           f"{path}:{number}"))
    return out


READERS = {
    "tsv": _read_tsv,
    "tsv_noheader": lambda p, c, e: _read_tsv(p, c, e, header=False),
    "csv": lambda p, c, e: _read_tsv(p, c, e, delimiter=","),
    "phrasebank": _read_phrasebank,
    "trec": _read_trec,
    "jsonl": _read_jsonl,
}


def _reader_for(path: Path) -> str:
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(path.suffix, "tsv")


@dataclass
class ClassificationTask(Task):
    """Options: how the head pools an encoder's tokens (`model.pooling`), and whether the loss
    weighs classes by their rarity (`data.class_weights`)."""

    pooling: str = "auto"
    class_weights: str = "none"
    name, main_metric = "classification", "accuracy"
    datasets, default_dataset = DATASETS, "sst2"

    @classmethod
    def from_config(cls, config: Any) -> "ClassificationTask":
        return cls(config.model.pooling, config.data.class_weights)

    def check(self, model: ModelSpec) -> None:
        if self.pooling == "pooler" and model.pooling != "mean":
            raise ConfigError("model.pooling=pooler is BERT's first-token pooler, for encoders; "
                              f"{model.name} is a decoder (its heads read the last token)")

    def read(self, path: Path, cfg: DataConfig, spec: DatasetSpec | None) -> list[Example]:
        reader = spec.reader if spec else _reader_for(path)
        examples = READERS[reader](path, cfg, spec.encoding if spec else "utf-8")
        for ex in examples:
            if not ex.text:
                raise DataError("empty text", *ex.where.rsplit(":", 1))
        return examples

    def table_fields(self, cfg: DataConfig) -> list[str]:
        return [cfg.text_field, cfg.label_field, cfg.text_pair_field]

    def from_rows(self, rows: list[dict], features: Any, cfg: DataConfig, path: Path
                  ) -> list[Example]:
        names = class_names(features, cfg.label_field)  # ClassLabel ids -> their names
        out = []
        for number, row in enumerate(rows, start=1):
            text, label = row[cfg.text_field], row[cfg.label_field]
            if not isinstance(text, str) or not text:
                raise DataError(f"column {cfg.text_field!r} is {text!r}, expected text", path,
                                number)
            if label is None:
                raise DataError(f"column {cfg.label_field!r} is empty", path, number)
            out.append(Example(text, names[label] if names else str(label),
                               str(row[cfg.text_pair_field]) if cfg.text_pair_field else None,
                               f"{path}:{number}"))
        return out

    def corpus_text(self, example: Example) -> str:
        return example.text if example.pair is None else f"{example.text} {example.pair}"

    def label_space(self, train: list[Example], dev: list[Example]) -> list[str]:
        labels = sorted({ex.label for ex in train})
        unseen = sorted({ex.label for ex in dev} - set(labels))
        if unseen:
            first = next(ex.where for ex in dev if ex.label in unseen)
            raise DataError(f"dev labels {unseen} never occur in the training data (first at "
                            f"{first}); training labels: {labels}")
        if len(labels) < 2:
            raise DataError(f"the training data has only the label(s) {labels}; need at least 2")
        return labels

    def encode(self, examples: list[Example], tokenizer: Any, labels: list[str],
               max_length: int, split: str) -> list[dict]:
        texts = [ex.text for ex in examples]
        pairs = [ex.pair for ex in examples] if examples and examples[0].pair is not None \
            else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        index = {label: i for i, label in enumerate(labels)}
        weights = balanced_weights([ex.label for ex in examples]) \
            if split == "train" and self.class_weights == "balanced" else {}
        features = []
        for i, ex in enumerate(examples):
            feature = model_inputs(enc, i)
            if ex.label is not None:
                feature["labels"] = index[ex.label]
            if weights:  # the head's loss reads it (a training split only)
                feature["class_weight"] = weights[ex.label]
            feature["_example"] = i
            features.append(feature)
        return features

    def build_head(self, hidden_size: int, labels: list[str], model: ModelSpec,
                   backbone_config: Any = None) -> nn.Module:
        encoder = model.pooling == "mean"  # the family's own way: mean (encoders), last token
        choice = self.pooling if self.pooling != "auto" else model.pooling
        if choice == "pooler":
            return PoolerHead(hidden_size, len(labels))
        if encoder or choice == "mean":
            return ClassificationHead(hidden_size, len(labels), "mean",
                                      dropout=0.1 if encoder else 0.0)
        # No dropout on a decoder's last-token state (as in transformers'
        # *ForSequenceClassification heads for GPT-style models): a few of its features carry
        # very large values (smollm2-135m: the largest is 30-40x the median feature and holds
        # 22-35% of the squared norm), so dropping one swings the logits. Measured effect on
        # SST-2 dev accuracy: +0.1 points over 6 seeds, within noise
        # (benchmarks/results/throughput_cpu_decoder_seeds.md).
        return ClassificationHead(hidden_size, len(labels), "last", dropout=0.0)

    def score(self, examples: list[Example], features: list[dict], predictions: list[int],
              labels: list[str]) -> dict[str, float]:
        gold, pred = self._gold_and_predicted(examples, features, predictions, labels)
        return classification_metrics(gold, pred, len(labels))

    def example_stats(self, examples: list[Example], features: list[dict],
                      predictions: list[int], labels: list[str]) -> list[list[float]]:
        gold, pred = self._gold_and_predicted(examples, features, predictions, labels)
        return [[float(g == p)] for g, p in zip(gold, pred)]  # accuracy: the mean

    @staticmethod
    def _gold_and_predicted(examples: list[Example], features: list[dict],
                            predictions: list[int], labels: list[str]
                            ) -> tuple[list[int], list[int]]:
        gold = [labels.index(ex.label) for ex in examples]
        pred = [0] * len(examples)
        for feature, p in zip(features, predictions):
            pred[feature["_example"]] = p
        return gold, pred

    def output(self, prediction: int, labels: list[str]) -> str:
        return labels[prediction]

    def make_examples(self, inputs: list[str | tuple[str, str]]) -> list[Example]:
        """Texts, or (text, pair) tuples, to examples without labels."""
        return [Example(x[0], None, x[1]) if isinstance(x, tuple) else Example(x, None)
                for x in inputs]


# ---------------------------------------------------------------------------------------------
# Model head and metrics.


def balanced_weights(labels: list[str]) -> dict[str, float]:
    """n / (k x count) per class (scikit-learn's "balanced"): every class weighs n / k in all."""
    counts = Counter(labels)
    return {label: len(labels) / (len(counts) * count) for label, count in counts.items()}


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           class_weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, each example weighted by its class weight when the batch carries them:
    sum(w * loss) / sum(w), as torch's `weight=` normalises."""
    if class_weight is None:
        return nn.functional.cross_entropy(logits.float(), labels)
    losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return (losses * class_weight).sum() / class_weight.sum()


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, pooling: str,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, class_weight: torch.Tensor | None = None,
                **_: Any) -> TaskOutput:
        pool = mean_pool if self.pooling == "mean" else last_token_pool
        logits = self.classifier(self.dropout(pool(hidden, attention_mask)))
        loss = None
        if labels is not None:
            loss = weighted_cross_entropy(logits, labels, class_weight)
        return TaskOutput(loss, logits)


class PoolerHead(nn.Module):
    """BERT's sequence-classification head, trained from scratch: dense + tanh on the first
    token, dropout, a linear classifier. The same computation as transformers'
    BertForSequenceClassification, so a trained model exports as one (adaptune export)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, class_weight: torch.Tensor | None = None,
                **_: Any) -> TaskOutput:
        logits = self.classifier(self.dropout(self.pooler(hidden[:, 0])))
        loss = None
        if labels is not None:
            loss = weighted_cross_entropy(logits, labels, class_weight)
        return TaskOutput(loss, logits)


def classification_metrics(gold: list[int], pred: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy, and macro-F1 over the classes that occur in gold or predictions (as
    scikit-learn's f1_score(average="macro") does, where a class with no support and no
    predictions is left out)."""
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for c in range(num_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}
