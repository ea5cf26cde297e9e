"""Shared data plumbing: where the data root is, reading text files safely, and subsetting.

The real data sets live outside the repository (../shared/data here); the root is a setting:
`data.data_dir`, else $ADAPTUNE_DATA, else ../shared/data beside the working folder or beside
this checkout.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from adaptune.config import DataConfig
from adaptune.errors import ConfigError, DataError

T = TypeVar("T")
MAX_LINE_CHARS = 1_000_000  # one example per line; longer means a file without line breaks


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set under the data root. `dev` may be empty for single-file sets, which
    are split 80/10/10 with a fixed seed (train = 80%, dev = the next 10%)."""

    train: str
    dev: str = ""
    reader: str = ""  # the task module's reader for this format
    encoding: str = "utf-8"
    note: str = ""


def data_root(cfg: DataConfig) -> Path:
    candidates = [cfg.data_dir, os.environ.get("ADAPTUNE_DATA", "")]
    candidates += [str(Path.cwd().parent / "shared" / "data"),
                   str(Path(__file__).resolve().parents[2] / "shared" / "data")]
    tried = [c for c in candidates if c]
    for c in tried:
        if Path(c).is_dir():
            return Path(c)
    raise DataError("data root not found; set data.data_dir or $ADAPTUNE_DATA. Tried: "
                    + ", ".join(tried))


def split_paths(cfg: DataConfig, spec: DatasetSpec | None) -> dict[str, Path]:
    """Paths of the train and dev files: explicit paths win over the named data set."""
    if spec is None and not (cfg.train_path and cfg.dev_path):
        raise DataError(f"data.dataset: unknown data set {cfg.dataset!r} and no "
                        "data.train_path / data.dev_path given")
    root = data_root(cfg) if spec is not None else Path(".")
    train = Path(cfg.train_path) if cfg.train_path else root / spec.train
    dev = Path(cfg.dev_path) if cfg.dev_path else (root / spec.dev if spec and spec.dev else train)
    return {"train": train, "dev": dev}


def read_bytes(path: Path) -> bytes:
    """A data file's bytes; what stands in the way (missing, a folder, a symlink loop, no
    permission) is a DataError that says which."""
    path = Path(path)
    try:
        if path.is_dir():
            raise DataError("is a folder, expected a data file", path)
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except PermissionError:
        raise DataError("permission denied: the file is not readable by this user", path) \
            from None
    except OSError as exc:  # ELOOP (a symlink loop), EIO, ...
        raise DataError(f"cannot be read: {exc.strerror or exc}", path) from None


def read_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline). A missing, empty, binary or mis-encoded
    file is a DataError that names the file (and line)."""
    raw = read_bytes(path)
    if not raw.strip():
        raise DataError("file is empty", path)
    if b"\x00" in raw[:65536]:
        raise DataError("looks like a binary file, expected text", path)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid {encoding} text (byte {exc.start})", path, line) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"line is {len(line):,} characters long, more than the "
                            f"{MAX_LINE_CHARS:,} allowed for one example (a file without line "
                            "breaks?)", path, number)
        yield number, line


DATASETS_BUILDERS = ("json", "csv", "parquet", "arrow")


def datasets_format(path: Path, cfg: DataConfig) -> str | None:
    """The `datasets` way to read `path` ("json", "csv", "parquet", "arrow", "disk"), or None
    for adaptune's own readers: they stay where `datasets` has no builder for the format (CoNLL
    columns, nested SQuAD JSON, the TSV variants of the shared sets) and give file:line errors."""
    if cfg.format != "auto":
        return cfg.format
    path = Path(path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        return "disk"
    return {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)


def read_table(path: Path, cfg: DataConfig, fields: Sequence[str]) -> tuple[list[dict], Any]:
    """The rows of a table read through `datasets` (and its features, for ClassLabel names),
    checked for the columns the task needs: a missing one is a DataError naming the file, the
    column and the columns there are."""
    import datasets

    kind = datasets_format(path, cfg)
    try:
        if kind == "disk":
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise DataError(f"is a DatasetDict with splits {list(table)}; point "
                                "data.train_path / data.dev_path at one split's folder", path)
        else:
            if not Path(path).exists():
                raise DataError("file not found", path)
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds; say which file and why
        raise DataError(f"could not be read as {kind} by datasets: {type(exc).__name__}: "
                        f"{str(exc)[:300]}", path) from None
    missing = [f for f in fields if f and f not in table.column_names]
    if missing:
        raise DataError(f"has no column {missing[0]!r} (columns: {', '.join(table.column_names)}"
                        f"); name it with data.{_field_setting(missing[0], cfg)}", path)
    if len(table) == 0:
        raise DataError("has no rows", path)
    return table.to_list(), table.features


def _field_setting(column: str, cfg: DataConfig) -> str:
    for name in ("text_field", "text_pair_field", "label_field", "tokens_field", "tags_field",
                 "question_field", "context_field", "answers_field", "document_field",
                 "summary_field"):
        if getattr(cfg, name) == column:
            return name
    return "<task>_field"


def class_names(features: Any, column: str) -> list[str] | None:
    """The names of a ClassLabel column (or of a sequence of ClassLabels), if it is one."""
    feature = features.get(column) if features is not None else None
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
    if isinstance(feature, list) and feature:  # datasets >= 4: List(ClassLabel) as [feature]
        feature = feature[0]
    return list(feature.names) if hasattr(feature, "names") else None


def read_jsonl_rows(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file; a line that is not
    a JSON object is a DataError naming the file and line."""
    import json

    for number, line in read_lines(path, encoding):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", path, number) from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path, number)
        yield number, row


def take_subset(items: Sequence[T], cfg: DataConfig, seed: int, split: str) -> list[T]:
    """Train: the selection split set aside (if any), then a seeded shuffle, then
    `train_fraction`, then `max_train_examples`. Selection: `selection_examples` drawn from the
    training file by `selection_seed` alone, in file order. Dev: the first `max_dev_examples`
    in file order (so every run is scored on the same examples)."""
    items = list(items)
    if split in ("train", "selection") and cfg.selection_examples:
        chosen = selection_indices(len(items), cfg)
        if split == "selection":
            return [items[i] for i in sorted(chosen)]
        items = [x for i, x in enumerate(items) if i not in chosen]
    if split == "train":
        random.Random(seed).shuffle(items)
        keep = max(1, int(round(len(items) * cfg.train_fraction)))
        items = items[:keep]
        if cfg.max_train_examples:
            items = items[: cfg.max_train_examples]
    elif cfg.max_dev_examples:
        items = items[: cfg.max_dev_examples]
    return items


def selection_indices(n: int, cfg: DataConfig) -> set[int]:
    """Which of the n training examples form the selection split."""
    if cfg.selection_examples >= n:
        raise ConfigError(f"data.selection_examples: {cfg.selection_examples} would leave no "
                          f"training examples (the training file has {n}); expected fewer")
    order = list(range(n))
    random.Random(cfg.selection_seed).shuffle(order)
    return set(order[:cfg.selection_examples])


def split_single_file(items: Sequence[T], split: str, seed: int = 1234) -> list[T]:
    """80/10/10 split of a set that has no official one, fixed by `seed` (independent of the
    run's seed, so every run sees the same dev set)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_train, n_dev = int(0.8 * len(items)), int(0.1 * len(items))
    picked = order[:n_train] if split == "train" else order[n_train:n_train + n_dev]
    return [items[i] for i in sorted(picked)]


def require_nonempty(items: Sequence[T], path: Path, split: str) -> None:
    if not items:
        raise DataError(f"the {split} split has no examples", path)


def pad_collate(features: Sequence[dict], pad_id: int, pad_values: dict[str, int] | None = None
                ) -> dict:
    """Pad every list-valued field to the longest in the batch (right padding) and stack it;
    scalar fields become 1-D tensors. Fields starting with "_" (bookkeeping) are left out."""
    import torch

    pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    pads.update(pad_values or {})
    batch: dict = {}
    for key in features[0]:
        if key.startswith("_"):
            continue
        values = [f[key] for f in features]
        if isinstance(values[0], (list, tuple)):
            width = max(len(v) for v in values)
            fill = pads.get(key, 0)
            batch[key] = torch.tensor([list(v) + [fill] * (width - len(v)) for v in values])
        else:
            batch[key] = torch.tensor(values)
    return batch
