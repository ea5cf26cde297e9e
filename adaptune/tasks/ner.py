"""Named-entity recognition (token classification).

Readers: CoNLL-style column files, whitespace- or tab-separated, word first and tag last, blank
lines between sentences, `-DOCSTART-` lines skipped (CoNLL-2003 4 columns, WNUT-17 / BC5CDR /
NCBI-disease 2 columns, SEC filings 4 columns with IO tags). The label set comes from the
training data.

Alignment: a word's label sits on its first sub-token; the other sub-tokens are ignored by the
loss. Predictions map back to exactly one tag per original word; words cut off by the length
limit are predicted `O`, so they still count in scoring (as misses if they were entities).

Metric: entity-level precision / recall / F1 exactly as conlleval computes them (chunks from
IOB1, IOB2/BIO, IOE, IOBES and IO tags; micro over entities, and per type).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from adaptune.config import DataConfig
from adaptune.data import DatasetSpec, class_names, read_lines
from adaptune.errors import DataError
from adaptune.modeling import TaskOutput
from adaptune.spec import ModelSpec
from adaptune.tasks import Task, model_inputs


@dataclass(frozen=True)
class Example:
    words: tuple[str, ...]
    tags: tuple[str, ...] | None
    where: str = ""


DATASETS = {
    "conll2003": DatasetSpec("ner/conll2003/train.txt", "ner/conll2003/dev.txt", "conll"),
    "wnut17": DatasetSpec("ner/wnut17/train.conll", "ner/wnut17/dev.conll", "conll"),
    "bc5cdr": DatasetSpec("ner/bc5cdr/train.tsv", "ner/bc5cdr/dev.tsv", "conll"),
    "ncbi_disease": DatasetSpec("ner/ncbi_disease/train.tsv", "ner/ncbi_disease/dev.tsv",
                                "conll"),
    "sec_filings": DatasetSpec("ner/sec_filings/train.txt", "ner/sec_filings/test.txt", "conll",
                               note="IO tags; no dev split: dev = the test file"),
}


# ---------------------------------------------------------------------------------------------
# Prepare data.


def read_conll(path: Path, encoding: str = "utf-8") -> list[Example]:
    """Sentences from a column file. Every token line must have the same number of columns as
    the file's first token line (at least 2: word ... tag)."""
    sentences: list[Example] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0
    columns = 0

    def flush() -> None:
        if words:
            sentences.append(Example(tuple(words), tuple(tags), f"{path}:{start}"))
        words.clear()
        tags.clear()

    for number, line in read_lines(path, encoding):
        parts = line.split()
        if not parts:
            flush()
            continue
        if parts[0] == "-DOCSTART-":
            flush()
            continue
        if not columns:
            columns = len(parts)
            if columns < 2:
                raise DataError("expected at least 2 columns (word ... tag)", path, number)
        if len(parts) != columns:
            raise DataError(f"expected {columns} columns (word ... tag) like the first token "
                            f"line, found {len(parts)}", path, number)
        tag = parts[-1]
        if tag != "O" and not (len(tag) > 2 and tag[1] == "-" and tag[0] in "BIESUL"):
            raise DataError(f"tag {tag!r} is not O or B-/I-/E-/S-TYPE (or BILOU's U-/L-)",
                            path, number)
        if tag[0] in "UL" and tag != "O":  # BILOU is IOBES with other letters: U = S, L = E
            tag = ("S" if tag[0] == "U" else "E") + tag[1:]
        if not words:
            start = number
        words.append(parts[0])
        tags.append(tag)
    flush()
    _check_one_scheme(sentences, path)
    return sentences


def _check_one_scheme(sentences: list[Example], path: Path) -> None:
    """A file must use one tagging scheme. IOBES (E-/S- tags) and IO/IOB1 (an entity opened by
    I- after O) cannot both be in it: chunks would be read differently in different places."""
    iobes_at = io_at = None
    for ex in sentences:
        prev = "O"
        for tag in ex.tags:
            if tag[:2] in ("E-", "S-") and iobes_at is None:
                iobes_at = ex.where.rsplit(":", 1)[-1]
            if tag.startswith("I-") and prev == "O" and io_at is None:
                io_at = ex.where.rsplit(":", 1)[-1]
            prev = tag
    if iobes_at and io_at:
        raise DataError(f"mixed tag schemes: IOBES tags (E-/S-) in the sentence at line "
                        f"{iobes_at}, but an entity opened with I- (IO/IOB1 style) in the "
                        f"sentence at line {io_at}; convert the file to one scheme", path)


class NerTask(Task):
    name, main_metric = "ner", "f1"
    datasets, default_dataset = DATASETS, "conll2003"

    def read(self, path: Path, cfg: DataConfig, spec: DatasetSpec | None) -> list[Example]:
        return read_conll(path)  # CoNLL columns: a format `datasets` has no builder for

    def table_fields(self, cfg: DataConfig) -> list[str]:
        return [cfg.tokens_field, cfg.tags_field]

    def from_rows(self, rows: list[dict], features: Any, cfg: DataConfig, path: Path
                  ) -> list[Example]:
        names = class_names(features, cfg.tags_field)  # e.g. conll2003's ClassLabel ids
        out = []
        for number, row in enumerate(rows, start=1):
            words, tags = row[cfg.tokens_field], row[cfg.tags_field]
            if not isinstance(words, list) or not isinstance(tags, list) or not words:
                raise DataError(f"columns {cfg.tokens_field!r} and {cfg.tags_field!r}: expected "
                                "two non-empty lists", path, number)
            if len(words) != len(tags):
                raise DataError(f"{len(words)} words but {len(tags)} tags", path, number)
            tags = [names[t] if names else str(t) for t in tags]
            out.append(Example(tuple(map(str, words)), tuple(tags), f"{path}:{number}"))
        return out

    def corpus_text(self, example: Example) -> str:
        return " ".join(example.words)

    def label_space(self, train: list[Example], dev: list[Example]) -> list[str]:
        labels = sorted({t for ex in train for t in ex.tags}, key=lambda t: (t != "O", t[2:], t))
        if labels == ["O"]:
            raise DataError(f"the training data has no entity tags, only O (first sentence at "
                            f"{train[0].where}): nothing to learn, and F1 would be 0; is the tag "
                            "the last column?")
        unseen = sorted({t for ex in dev for t in ex.tags} - set(labels))
        if unseen:
            first = next(ex.where for ex in dev if set(ex.tags) & set(unseen))
            raise DataError(f"dev tags {unseen} never occur in the training data (first in the "
                            f"sentence at {first}); training tags: {labels}")
        return labels

    def encode(self, examples: list[Example], tokenizer: Any, labels: list[str],
               max_length: int, split: str) -> list[dict]:
        """The label of each word sits on its first sub-token; `_first` maps words back."""
        enc = tokenizer([list(ex.words) for ex in examples], is_split_into_words=True,
                        truncation=True, max_length=max_length)
        index = {t: i for i, t in enumerate(labels)}
        features = []
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            first = {}  # word index -> position of its first sub-token
            for pos, w in enumerate(word_ids):
                if w is not None and w not in first:
                    first[w] = pos
            feature = model_inputs(enc, i)
            if ex.tags is not None:
                feature["labels"] = [-100] * len(word_ids)
                for w, pos in first.items():
                    feature["labels"][pos] = index[ex.tags[w]]
            feature["_example"] = i
            feature["_first"] = [first.get(w, -1) for w in range(len(ex.words))]
            features.append(feature)
        return features

    def build_head(self, hidden_size: int, labels: list[str], model: ModelSpec,
                   backbone_config: Any = None) -> nn.Module:
        return TokenHead(hidden_size, len(labels))

    def decode(self, examples: list[Example], features: list[dict],
               predictions: list[list[int]], labels: list[str]) -> list[list[str]]:
        """One tag per original word; a word with no sub-token left (cut by the length limit)
        is O."""
        out: list[list[str]] = [[] for _ in examples]
        for feature, token_preds in zip(features, predictions):
            out[feature["_example"]] = [labels[token_preds[pos]] if pos >= 0 else "O"
                                        for pos in feature["_first"]]
        return out

    def score(self, examples: list[Example], features: list[dict],
              predictions: list[list[int]], labels: list[str]) -> dict[str, float]:
        predicted = self.decode(examples, features, predictions, labels)
        return conlleval([list(ex.tags) for ex in examples], predicted)

    def example_stats(self, examples: list[Example], features: list[dict],
                      predictions: list[list[int]], labels: list[str]) -> list[list[float]]:
        """Per sentence: (correct, gold, predicted) entities. Every sentence ends in a boundary,
        so their sums are conlleval's counts exactly."""
        predicted = self.decode(examples, features, predictions, labels)
        return [list(map(float, chunk_counts([list(ex.tags)], [p])[:3]))
                for ex, p in zip(examples, predicted)]

    def metric_from_stats(self, sums: Sequence[float], n: int) -> float:
        correct, gold, pred = sums[:3]
        return 2.0 * correct / (gold + pred) if gold + pred else 0.0

    def make_examples(self, inputs: Sequence[Sequence[str] | str]) -> list[Example]:
        """Word lists (or whitespace-separated strings) to examples without tags."""
        return [Example(tuple(x.split() if isinstance(x, str) else x), None) for x in inputs]


# ---------------------------------------------------------------------------------------------
# Model head.


class TokenHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, **_: Any) -> TaskOutput:
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=-100)
        return TaskOutput(loss, logits)


# ---------------------------------------------------------------------------------------------
# conlleval: a line-by-line equivalent of the CoNLL-2000 perl script's chunk logic.


def _split(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    return (prefix, kind) if sep else (tag, "")


def _chunk_end(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _chunk_start(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def conlleval(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity precision, recall and F1 (micro, and `f1_<TYPE>` per type), as conlleval.pl.
    Each sentence is followed by a boundary, which closes any open chunk."""
    correct, found_gold, found_pred, per_type = chunk_counts(gold, pred)

    def prf(c: int, fg: int, fp: int) -> tuple[float, float, float]:
        precision = c / fp if fp else 0.0
        recall = c / fg if fg else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    precision, recall, f1 = prf(correct, found_gold, found_pred)
    metrics = {"f1": f1, "precision": precision, "recall": recall}
    for kind in sorted(per_type):
        metrics[f"f1_{kind}"] = prf(*per_type[kind])[2]
    return metrics


def chunk_counts(gold: list[list[str]], pred: list[list[str]]
                 ) -> tuple[int, int, int, dict[str, list[int]]]:
    """(correct, gold, predicted) entity counts, overall and per type, by conlleval's chunk
    rules."""
    correct = found_gold = found_pred = 0
    per_type: dict[str, list[int]] = {}  # type -> [correct, found gold, found pred]

    def bump(kind: str, slot: int) -> None:
        per_type.setdefault(kind, [0, 0, 0])[slot] += 1

    for g_sent, p_sent in zip(gold, pred, strict=True):
        if len(g_sent) != len(p_sent):
            raise ValueError(f"sentence of {len(g_sent)} gold tags vs {len(p_sent)} predicted")
        in_correct = False
        prev_g, prev_gt, prev_p, prev_pt = "O", "", "O", ""
        for g_tag, p_tag in list(zip(g_sent, p_sent)) + [("O", "O")]:
            g, gt = _split(g_tag)
            p, pt = _split(p_tag)
            end_g = _chunk_end(prev_g, g, prev_gt, gt)
            end_p = _chunk_end(prev_p, p, prev_pt, pt)
            start_g = _chunk_start(prev_g, g, prev_gt, gt)
            start_p = _chunk_start(prev_p, p, prev_pt, pt)
            if in_correct:
                if end_g and end_p and prev_gt == prev_pt:
                    in_correct = False
                    correct += 1
                    bump(prev_gt, 0)
                elif end_g != end_p or gt != pt:
                    in_correct = False
            if start_g and start_p and gt == pt:
                in_correct = True
            if start_g:
                found_gold += 1
                bump(gt, 1)
            if start_p:
                found_pred += 1
                bump(pt, 2)
            prev_g, prev_gt, prev_p, prev_pt = g, gt, p, pt
    return correct, found_gold, found_pred, per_type
