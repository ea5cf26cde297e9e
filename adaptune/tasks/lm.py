"""Language modelling on raw in-domain text: the first stage of domain adaptation.

Prepare: a corpus of documents (plain text, one document per line; JSON lines with a "text"
field; or a named corpus drawn from the data root), cleaned (white space normalised, documents
under 3 words dropped) and exact duplicates removed; a fixed 5% of documents is held out as the
dev split, for perplexity. Encode: documents are tokenized, joined with a separator and packed
into blocks of `model.max_length` tokens.

Objectives: masked LM for encoders (15% of the tokens of each block are chosen; of those 80%
become [MASK], 10% a random token and 10% stay as they are; chosen once per block with a fixed
seed, as BERT's static masking), causal LM for decoders. The zoo encoders ship no masked-LM
head, so one is created: dense + GELU + LayerNorm, then the output layer *tied to the word
embeddings* (not a copy: peft leaves the embeddings frozen and the tie intact) plus a bias.

Metrics: mean loss per predicted token and its exponential, perplexity (for masked LM this is
the pseudo-perplexity of the masked tokens). Lower is better.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from adaptune.config import DataConfig, RunConfig
from adaptune.data import data_root, read_jsonl_rows, read_lines, take_subset
from adaptune.errors import ConfigError, DataError
from adaptune.modeling import CausalLMHead, TaskOutput
from adaptune.spec import Family, ModelSpec
from adaptune.tasks import Task

MASK_FRACTION, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1
HELDOUT_FRACTION = 0.05
MIN_WORDS = 3


@dataclass(frozen=True)
class Example:
    text: str


@dataclass
class CorpusStats:
    documents_read: int = 0
    too_short: int = 0
    duplicates: int = 0

    @property
    def kept(self) -> int:
        return self.documents_read - self.too_short - self.duplicates


# ---------------------------------------------------------------------------------------------
# Prepare data: corpus sources, cleaning, de-duplication, the held-out slice.


def _conll_sentences(path: Path) -> list[str]:
    from adaptune.tasks.ner import read_conll

    return [" ".join(ex.words) for ex in read_conll(path)]


def _pubmed_abstracts(path: Path) -> list[str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [" ".join(entry["CONTEXTS"]) for entry in data.values()]


def _squad_contexts(path: Path) -> list[str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [p["context"] for article in data["data"] for p in article["paragraphs"]]


def _classification_train(dataset: str) -> Any:
    """A reader of a single-file classification set that keeps only the training part of its
    fixed 80/10/10 split: the dev and test rows must not leak into the domain corpus that the
    task is later evaluated after."""
    def read(path: Path) -> list[str]:
        from adaptune.tasks.classification import DATASETS, ClassificationTask

        task, spec = ClassificationTask(), DATASETS[dataset]
        return [ex.text for ex in task.split(task.read(path, DataConfig(), spec), "train", spec)]
    return read


def _tsv_column(path: Path, column: str) -> list[str]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


# Named corpora: unlabelled in-domain text from the data root (training splits only).
CORPORA: dict[str, list[tuple[str, Any]]] = {
    "pubmed": [("cls/pubmedqa/ori_pqal.json", _pubmed_abstracts)],
    "bc5cdr_text": [("ner/bc5cdr/train.tsv", _conll_sentences)],
    "ncbi_text": [("ner/ncbi_disease/train.tsv", _conll_sentences)],
    "covid": [("qa/covid_qa/covid_qa.json", _squad_contexts)],
    "legal": [("cls/legal_unfair_tos/data.tsv", _classification_train("legal_unfair_tos")),
              ("cls/legal_overruling/test.tsv", lambda p: _tsv_column(p, "text"))],
    "finance": [("cls/financial_phrasebank/Sentences_50Agree.txt",
                 _classification_train("financial_phrasebank")),
                ("ner/sec_filings/train.txt", _conll_sentences)],
}
CORPORA["bio"] = CORPORA["pubmed"] + CORPORA["bc5cdr_text"] + CORPORA["ncbi_text"]


def read_corpus_file(path: Path, text_field: str = "text") -> list[str]:
    """Plain text (one document per line) or JSON lines with a text field."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        return [line for _, line in read_lines(path)]
    docs = []
    for number, row in read_jsonl_rows(path):
        if not isinstance(row.get(text_field), str):
            raise DataError(f"expected a JSON object with a string field {text_field!r}",
                            path, number)
        docs.append(row[text_field])
    return docs


def clean(docs: list[str]) -> tuple[list[str], CorpusStats]:
    """Normalise white space, drop documents under MIN_WORDS words, remove exact duplicates
    (after normalisation), keeping first occurrences in order."""
    stats = CorpusStats(documents_read=len(docs))
    seen: set[str] = set()
    kept = []
    for doc in docs:
        text = re.sub(r"\s+", " ", doc).strip()
        if len(text.split()) < MIN_WORDS:
            stats.too_short += 1
            continue
        if text in seen:
            stats.duplicates += 1
            continue
        seen.add(text)
        kept.append(text)
    return kept, stats


def load_corpus(cfg: DataConfig) -> tuple[list[str], CorpusStats, str]:
    """All cleaned documents of the configured corpus, and where they came from."""
    if cfg.train_path:
        paths = [Path(p) for p in cfg.train_path.split(",")]
        docs = [d for p in paths for d in read_corpus_file(p, cfg.text_field)]
        where = cfg.train_path
    elif cfg.dataset in CORPORA:
        root = data_root(cfg)
        docs = [d for rel, reader in CORPORA[cfg.dataset] for d in reader(root / rel)]
        where = f"corpus {cfg.dataset!r}"
    else:
        raise DataError(f"data.dataset: unknown corpus {cfg.dataset!r}; named corpora: "
                        f"{', '.join(sorted(CORPORA))}, or give files in data.train_path")
    kept, stats = clean(docs)
    if not kept:
        reason = ("all of its documents are duplicates of the first ones"
                  if stats.duplicates and not stats.too_short else
                  f"no document has {MIN_WORDS} words or more")
        raise DataError(f"{where}: the corpus is empty after cleaning ({stats.documents_read} "
                        f"read, {stats.too_short} too short, {stats.duplicates} duplicates): "
                        f"{reason}")
    return kept, stats, where


# ---------------------------------------------------------------------------------------------
# Encode: pack into blocks; static masking for masked LM.


def objective(tokenizer: Any, wanted: str) -> str:
    """"mlm" or "clm": the one asked for, checked against the tokenizer ("auto" picks)."""
    has_mask = tokenizer.mask_token_id is not None
    if wanted == "auto":
        return "mlm" if has_mask else "clm"
    if wanted == "mlm" and not has_mask:
        raise ConfigError("data.lm_objective=mlm needs a model with a [MASK] token (an encoder); "
                          "this tokenizer has none: a decoder? Use data.lm_objective=clm")
    if wanted == "clm" and has_mask:
        raise ConfigError("data.lm_objective=clm needs a decoder (GPT-style) model; this one has "
                          "a [MASK] token: an encoder? Use data.lm_objective=mlm")
    return wanted


def pack(docs: list[str], tokenizer: Any, block: int, separator: int) -> list[list[int]]:
    """Token ids of all documents, joined by `separator`, cut into blocks of `block` tokens
    (the last, shorter block is kept if it has at least 8 tokens or is a full block)."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids += enc + [separator]
    blocks = [ids[i:i + block] for i in range(0, len(ids), block)]
    if blocks and len(blocks[-1]) < min(8, block):  # a last scrap is not worth a forward pass
        blocks.pop()
    return blocks


def mask_tokens(ids: list[int], tokenizer: Any, rng: random.Random) -> tuple[list[int], list[int]]:
    """BERT's rule: choose 15% of the non-special positions (at least one); of those, 80% become
    [MASK], 10% a random non-special token, 10% stay. Returns (inputs, labels)."""
    special = set(tokenizer.all_special_ids)
    candidates = [i for i, t in enumerate(ids) if t not in special]
    chosen = rng.sample(candidates, max(1, round(MASK_FRACTION * len(candidates))))
    inputs, labels = list(ids), [-100] * len(ids)
    vocab = len(tokenizer)
    for pos in chosen:
        labels[pos] = ids[pos]
        draw = rng.random()
        if draw < MASK_TOKEN:
            inputs[pos] = tokenizer.mask_token_id
        elif draw < MASK_TOKEN + RANDOM_TOKEN:
            token = rng.randrange(vocab)
            while token in special:
                token = rng.randrange(vocab)
            inputs[pos] = token
    return inputs, labels


# ---------------------------------------------------------------------------------------------
# The task.


@dataclass
class LanguageModelTask(Task):
    """Options: the objective (`data.lm_objective`) and the seed of the static masking."""

    objective: str = "auto"
    seed: int = 0
    name, main_metric, higher_is_better = "lm", "perplexity", False
    datasets, default_dataset = CORPORA, "bio"
    lm_head = True
    packable = False  # prediction is not one forward pass without the targets

    @classmethod
    def from_config(cls, config: RunConfig) -> "LanguageModelTask":
        return cls(config.data.lm_objective, config.train.seed)

    def load(self, cfg: DataConfig, split: str, seed: int) -> list[Example]:
        """train: the corpus minus the held-out slice; dev: the held-out slice (or
        data.dev_path)."""
        if split == "dev" and cfg.dev_path:
            docs, _ = clean(read_corpus_file(Path(cfg.dev_path), cfg.text_field))
        else:
            docs, stats, where = load_corpus(cfg)
            if len(docs) < 2:
                raise DataError(f"{where}: need at least 2 distinct documents (one to hold out); "
                                f"{stats.documents_read} read, {stats.duplicates} exact duplicates "
                                f"and {stats.too_short} too short removed, {len(docs)} left")
            order = list(range(len(docs)))
            random.Random(1234).shuffle(order)  # fixed: every run holds out the same documents
            n_held = max(1, int(HELDOUT_FRACTION * len(docs)))
            held = set(order[:n_held])
            if split in ("train", "selection") and not cfg.dev_path:
                docs = [d for i, d in enumerate(docs) if i not in held]
            elif split == "dev":
                docs = [d for i, d in enumerate(docs) if i in held]
        # The same seeded subset as every other task (train_fraction means the same thing).
        return take_subset([Example(d) for d in docs], cfg, seed, split)

    def check(self, model: ModelSpec) -> None:
        if model.family is Family.DECODER and self.objective == "mlm":
            raise ConfigError("data.lm_objective=mlm needs an encoder (BERT-style) model; this "
                              "one is a decoder: use data.lm_objective=clm (or auto)")
        if model.family is Family.ENCODER and self.objective == "clm":
            raise ConfigError("data.lm_objective=clm needs a decoder (GPT-style) model; this one "
                              "is an encoder: use data.lm_objective=mlm (or auto)")

    def encode(self, examples: list[Example], tokenizer: Any, labels: list[str],
               max_length: int, split: str) -> list[dict]:
        """Documents packed into blocks; masked LM chooses its positions once per block."""
        kind = objective(tokenizer, self.objective)
        seed = self.seed + (0 if split == "train" else 10**6)
        rng = random.Random(seed)
        docs = [ex.text for ex in examples]
        features = []
        if kind == "mlm":
            for block in pack(docs, tokenizer, max_length - 2, tokenizer.sep_token_id):
                ids = [tokenizer.cls_token_id] + block + [tokenizer.sep_token_id]
                inputs, target = mask_tokens(ids, tokenizer, rng)
                features.append({"input_ids": inputs, "attention_mask": [1] * len(ids),
                                 "labels": target})
        else:
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            for block in pack(docs, tokenizer, max_length - len(bos), tokenizer.eos_token_id):
                ids = bos + block
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                                 "labels": list(ids)})
        for i, f in enumerate(features):
            f["_example"] = i
        if not features:
            raise DataError(f"the {split} corpus packs into no block of at least 8 tokens")
        return features

    def build_head(self, hidden_size: int, labels: list[str], model: ModelSpec,
                   backbone_config: Any = None) -> nn.Module:
        if model.family is Family.DECODER:
            return CausalLMHead()
        eps = getattr(backbone_config, "layer_norm_eps", 1e-12)
        return MaskedLMHead(hidden_size, backbone_config.vocab_size, eps)

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor],
                tokenizer: Any) -> list[tuple[float, int]]:
        """Per row: (summed loss over its predicted tokens, number of those tokens)."""
        out = model(**batch)  # labels included: the masked-LM head keeps only masked positions
        labels = batch["labels"]
        if out.logits.dim() == 3:  # causal LM: position t predicts token t+1
            losses = nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2),
                                                 labels[:, 1:], ignore_index=-100, reduction="none")
            counts = (labels[:, 1:] != -100).sum(1)
            return list(zip(losses.sum(1).tolist(), counts.tolist()))
        # masked LM: logits of every masked position of the batch, row after row
        losses = nn.functional.cross_entropy(out.logits.float(), labels[labels != -100],
                                             reduction="none")
        rows, start = [], 0
        for n in (labels != -100).sum(1).tolist():
            rows.append((float(losses[start:start + n].sum()), n))
            start += n
        return rows

    def score(self, examples: list[Example], features: list[dict],
              predictions: list[tuple[float, int]], labels: list[str]) -> dict[str, float]:
        total = sum(p[0] for p in predictions)
        tokens = sum(p[1] for p in predictions)
        loss = total / max(1, tokens)
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "tokens": float(tokens)}

    def example_stats(self, examples: list[Example], features: list[dict],
                      predictions: list[tuple[float, int]], labels: list[str]
                      ) -> list[list[float]]:
        return [[float(loss), float(tokens)] for loss, tokens in predictions]  # per block

    def metric_from_stats(self, sums: Sequence[float], n: int) -> float:
        return math.exp(min(float(sums[0]) / max(1.0, float(sums[1])), 50.0))

    def decode(self, examples: list[Example], features: list[dict], predictions: list,
               labels: list[str] = ()) -> list[float]:
        """Mean loss per predicted token of each block."""
        return [p[0] / max(1, p[1]) for p in predictions]

    def make_examples(self, inputs: list[str]) -> list[Example]:
        return [Example(t) for t in inputs]


# ---------------------------------------------------------------------------------------------
# Model head.


class MaskedLMHead(nn.Module):
    """BERT's prediction head, with the output layer tied to the word embeddings (passed in by
    the TaskModel at every call, so the tie is never broken by copies)."""

    ties_embeddings = True

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                **_: Any) -> TaskOutput:
        if labels is not None:  # only masked positions are scored: skip the rest
            keep = labels != -100
            hidden, labels = hidden[keep], labels[keep]
        h = self.norm(nn.functional.gelu(self.dense(hidden)))
        logits = nn.functional.linear(h, embeddings.to(h.dtype), self.bias.to(h.dtype))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return TaskOutput(loss, logits)
