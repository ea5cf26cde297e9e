"""Extractive question answering (SQuAD v1.1 and v2.0 style).

Prepare: SQuAD JSON (articles -> paragraphs -> questions); each answer's `answer_start` must
point at its text in the context. Long contexts are cut into windows of `model.max_length`
tokens that overlap by `STRIDE` tokens; token-to-character offsets are kept for decoding.
Head: a linear layer giving start and end logits per token.
Decode: per question, the best span over all its windows among the n-best start x end pairs
(end >= start, at most `MAX_ANSWER_TOKENS`, inside the context); for v2.0 data the answer is
empty when the no-answer score (start = end = [CLS]) beats the best span.
Metrics: exact match and F1 with the official SQuAD answer normalisation, best over all gold
answers, with v2.0's HasAns / NoAns breakdown.
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune.config import DataConfig
from adaptune.data import DatasetSpec, read_bytes
from adaptune.errors import DataError
from adaptune.modeling import TaskOutput
from adaptune.spec import ModelSpec
from adaptune.tasks import Task, model_inputs

STRIDE = 64  # tokens of overlap between consecutive windows of a long context
N_BEST = 20
MAX_ANSWER_TOKENS = 30


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, character start); empty: no answer
    article: int = 0


DATASETS = {
    # The SQuAD v2.0 dev file's 16 articles: train on the first 12, evaluate on the last 4.
    "squad_v2_dev_part": DatasetSpec("qa/squad_v2_dev_part/dev-v2.0.json", "", "articles",
                                     note="articles 1-12 train, 13-16 dev"),
    # The same articles, answerable questions only: a SQuAD v1.1-style set.
    "squad_v1_dev_part": DatasetSpec("qa/squad_v2_dev_part/dev-v2.0.json", "",
                                     "articles-answerable",
                                     note="answerable questions only; same article split"),
    "covid_qa": DatasetSpec("qa/covid_qa/covid_qa.json", "", "articles",
                            note="papers: first 75% train, rest dev"),
    "policyqa": DatasetSpec("qa/policyqa/dev.json", "qa/policyqa/test.json", "",
                            note="no train split here: train = dev file, dev = test file"),
}


# ---------------------------------------------------------------------------------------------
# Prepare data.


def read_squad(path: Path) -> list[Example]:
    path = Path(path)
    try:
        data = json.loads(read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not a SQuAD JSON file: {exc}", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError("expected SQuAD JSON: {\"data\": [{\"paragraphs\": [...]}]}", path)
    examples = []
    for article_index, article in enumerate(data["data"]):
        for p_index, paragraph in enumerate(_field(article, "paragraphs", list, path, [])):
            where = f"article {article_index + 1}, paragraph {p_index + 1}"
            context = _field(paragraph, "context", str, path, where=where)
            for qa in _field(paragraph, "qas", list, path, []):
                qid = str(qa.get("id", "")) if isinstance(qa, dict) else ""
                where_q = f"{where}, question id {qid or '?'}"
                question = _field(qa, "question", str, path, where=where_q)
                answers = []
                if not qa.get("is_impossible", False):
                    for answer in _field(qa, "answers", list, path, [], where_q):
                        text = _field(answer, "text", str, path, where=where_q)
                        start = _field(answer, "answer_start", int, path, where=where_q)
                        if not text or start < 0:
                            raise DataError(f"{where_q}: answer {text!r} at {start}: expected "
                                            "a non-empty text at a start >= 0", path)
                        if context[start:start + len(text)] != text:
                            raise DataError(
                                f"question id {qid}: answer {text!r} is not at answer_start "
                                f"{start} of its context (found "
                                f"{context[start:start + len(text)]!r})", path)
                        answers.append((text, start))
                    if not answers:
                        raise DataError(f"question id {qid}: no answers and not marked "
                                        "is_impossible", path)
                examples.append(Example(qid, question, context, tuple(answers), article_index))
    return examples


_MISSING = object()


def _field(record: Any, key: str, kind: type, path: Path, default: Any = _MISSING,
           where: str = "") -> Any:
    """record[key], checked to be of `kind`; a missing or mistyped field is a DataError that
    says where it is (a missing optional field gives `default`)."""
    if not isinstance(record, dict):
        raise DataError(f"{where or 'record'}: expected a JSON object, got "
                        f"{type(record).__name__}", path)
    value = record.get(key, _MISSING)
    if value is _MISSING and default is not _MISSING:
        return default
    if value is _MISSING or not isinstance(value, kind) or isinstance(value, bool):
        got = "nothing" if value is _MISSING else repr(value)[:40]
        raise DataError(f"{where + ': ' if where else ''}field {key!r}: expected "
                        f"{kind.__name__}, got {got}", path)
    return value


class QaTask(Task):
    name, main_metric, metric_scale = "qa", "f1", 100.0
    datasets, default_dataset = DATASETS, "squad_v2_dev_part"
    target_keys = ("start_positions", "end_positions")

    def table_fields(self, cfg: DataConfig) -> list[str]:
        return [cfg.question_field, cfg.context_field, cfg.answers_field]

    def from_rows(self, rows: list[dict], features: Any, cfg: DataConfig, path: Path
                  ) -> list[Example]:
        """The hub's flat SQuAD layout: one row per question, answers as {"text": [...],
        "answer_start": [...]} (empty lists: no answer)."""
        out = []
        for number, row in enumerate(rows, start=1):
            context, answers = row[cfg.context_field], row[cfg.answers_field] or {}
            texts, starts = answers.get("text") or [], answers.get("answer_start") or []
            if len(texts) != len(starts):
                raise DataError(f"column {cfg.answers_field!r}: {len(texts)} texts but "
                                f"{len(starts)} starts", path, number)
            for text, start in zip(texts, starts):
                if context[start:start + len(text)] != text:
                    raise DataError(f"answer {text!r} is not at answer_start {start} of its "
                                    f"context", path, number)
            out.append(Example(str(row.get("id", number)), row[cfg.question_field], context,
                               tuple(zip(texts, starts))))
        return out

    def corpus_text(self, example: Example) -> str:
        return f"{example.question} {example.context}"

    def read(self, path: Path, cfg: DataConfig, spec: DatasetSpec | None) -> list[Example]:
        # Nested SQuAD JSON (data -> paragraphs -> qas): no `datasets` builder reads it as such.
        examples = read_squad(path)
        if spec is not None and spec.reader == "articles-answerable":
            examples = [ex for ex in examples if ex.answers]
        return examples

    def split(self, examples: list[Example], split: str, spec: DatasetSpec | None
              ) -> list[Example]:
        """Sets split by article: the first 75% of articles train, the rest dev (no article's
        paragraphs in both)."""
        if spec is None or not spec.reader.startswith("articles"):
            return super().split(examples, split, spec)
        articles = sorted({ex.article for ex in examples})
        cut = articles[int(round(0.75 * len(articles))) - 1]
        return [ex for ex in examples if (ex.article <= cut) == (split == "train")]

    def encode(self, examples: list[Example], tokenizer: Any, labels: list[str],
               max_length: int, split: str) -> list[dict]:
        """Windows with offsets; training targets on the tokens of the first gold answer."""
        enc = tokenizer(_cap_questions(examples, tokenizer, max_length // 2),
                        [ex.context for ex in examples], truncation="only_second",
                        max_length=max_length,
                        stride=min(STRIDE, max_length // 4), return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        features = []
        for i, example_index in enumerate(enc["overflow_to_sample_mapping"]):
            ex = examples[example_index]
            sequence_ids = enc.sequence_ids(i)
            offsets = [off if sequence_ids[k] == 1 else None
                       for k, off in enumerate(enc["offset_mapping"][i])]
            feature = model_inputs(enc, i)
            start_tok = end_tok = 0  # [CLS]: no answer in this window
            if ex.answers:
                text, start_char = ex.answers[0]
                end_char = start_char + len(text)
                inside = [k for k, off in enumerate(offsets) if off is not None]
                if offsets[inside[0]][0] <= start_char and offsets[inside[-1]][1] >= end_char:
                    start_tok = next(k for k in inside if offsets[k][1] > start_char)
                    end_tok = max(k for k in inside if offsets[k][0] < end_char)
            feature["start_positions"] = start_tok
            feature["end_positions"] = end_tok
            feature["_example"] = example_index
            feature["_offsets"] = offsets
            features.append(feature)
        return features

    def build_head(self, hidden_size: int, labels: list[str], model: ModelSpec,
                   backbone_config: Any = None) -> nn.Module:
        return SpanHead(hidden_size)

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor],
                tokenizer: Any) -> list[tuple[list, list]]:
        inputs = {k: v for k, v in batch.items() if k not in self.target_keys}
        start, end = model(**inputs).logits
        lengths = batch["attention_mask"].sum(1).tolist()
        return [(s[:n].tolist(), e[:n].tolist()) for s, e, n in zip(start, end, lengths)]

    def decode(self, examples: list[Example], features: list[dict], predictions: list,
               labels: list[str] = ()) -> list[str]:
        """The answer text per example ("" for no answer, where the data allow one)."""
        allow_empty = any(not ex.answers for ex in examples)
        by_example: dict[int, list[int]] = collections.defaultdict(list)
        for k, feature in enumerate(features):
            by_example[feature["_example"]].append(k)
        answers = []
        for i, ex in enumerate(examples):
            best_score, best_text, null_score = -float("inf"), "", float("inf")
            for k in by_example[i]:
                starts, ends = predictions[k]
                offsets = features[k]["_offsets"]
                null_score = min(null_score, starts[0] + ends[0])
                top_s = sorted(range(len(starts)), key=lambda j: -starts[j])[:N_BEST]
                top_e = sorted(range(len(ends)), key=lambda j: -ends[j])[:N_BEST]
                for s in top_s:
                    for e in top_e:
                        if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None
                                or offsets[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS):
                            continue
                        score_ = starts[s] + ends[e]
                        if score_ > best_score:
                            best_score = score_
                            best_text = ex.context[offsets[s][0]:offsets[e][1]]
            answers.append("" if allow_empty and null_score > best_score else best_text)
        return answers

    def score(self, examples: list[Example], features: list[dict], predictions: list,
              labels: list[str]) -> dict[str, float]:
        return squad_metrics(examples, self.decode(examples, features, predictions))

    def example_stats(self, examples: list[Example], features: list[dict], predictions: list,
                      labels: list[str]) -> list[list[float]]:
        answers = self.decode(examples, features, predictions)
        return [[100.0 * max(f1_score(g, pred) for g in _golds(ex))]
                for ex, pred in zip(examples, answers)]

    def make_examples(self, inputs: list[tuple[str, str]]) -> list[Example]:
        """(question, context) pairs to examples without answers."""
        return [Example(str(i), q, c, ()) for i, (q, c) in enumerate(inputs)]


def _cap_questions(examples: list[Example], tokenizer: Any, limit: int) -> list[str]:
    """Questions cut to `limit` tokens: windows must leave room for the context (a tokenizer
    refuses to window a context when the question alone fills the length)."""
    enc = tokenizer([ex.question for ex in examples], add_special_tokens=False,
                    return_offsets_mapping=True)
    return [ex.question if len(offsets) <= limit else ex.question[:offsets[limit - 1][1]]
            for ex, offsets in zip(examples, enc["offset_mapping"])]



class SpanHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.qa_outputs = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, **_: Any) -> TaskOutput:
        logits = self.qa_outputs(hidden).float()
        logits = logits.masked_fill(attention_mask.unsqueeze(-1) == 0, -1e4)
        start, end = logits.unbind(-1)
        loss = None
        if start_positions is not None:
            loss = (nn.functional.cross_entropy(start, start_positions)
                    + nn.functional.cross_entropy(end, end_positions)) / 2
        return TaskOutput(loss, (start, end))


# ---------------------------------------------------------------------------------------------
# Metrics: the official SQuAD v2.0 evaluation.


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single
    spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_score(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:  # no-answer: 1 if both empty, else 0
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _golds(ex: Example) -> list[str]:
    """Gold answers that normalise to something; none left means no-answer ("")."""
    return [t for t, _ in ex.answers if normalize_answer(t)] or [""]


def squad_metrics(examples: list[Example], predictions: list[str]) -> dict[str, float]:
    """EM and F1 in [0, 100] as the official v2.0 script reports them, max over gold answers
    (gold answers that normalise to "" are dropped; none left means no-answer)."""
    exact, f1, has_ans = [], [], []
    for ex, pred in zip(examples, predictions, strict=True):
        golds = _golds(ex)
        exact.append(max(exact_score(g, pred) for g in golds))
        f1.append(max(f1_score(g, pred) for g in golds))
        has_ans.append(bool(ex.answers))
    out = {"exact": 100.0 * sum(exact) / len(exact), "f1": 100.0 * sum(f1) / len(f1)}
    for name, keep in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has_ans) if h == keep]
        if idx:
            out[f"{name}_exact"] = 100.0 * sum(exact[i] for i in idx) / len(idx)
            out[f"{name}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
    return out
