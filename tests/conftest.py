"""Shared fixtures and helpers: tiny models built from config (offline, seconds), single-threaded
torch, the test tiers, the shared-data guard and the SIGKILL victim scripts.

Tiers (markers): `unit` (tiny models in-process; every test not marked otherwise),
`integration` (subprocesses, `accelerate launch`, real kills, torch.compile) and `slow` (real zoo
checkpoints on real data). `python -m pytest -m unit` runs the first tier alone.
"""

from __future__ import annotations

import os
import signal
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ADAPTUNE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # two threads on tiny models stall badly on 2-core machines

DATA = Path(os.environ.get("ADAPTUNE_DATA",
                          Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not present")


def pytest_collection_modifyitems(config, items):
    """Every test that is not integration or slow is a unit test."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "slow")):
            item.add_marker(pytest.mark.unit)


def run_victim(tmp_path: Path, body: str, *, kill_at_clip: int | None = None,
               clip_owner: str = "accelerate.Accelerator") -> None:
    """Run `body` (Python source) in a fresh single-threaded interpreter that SIGKILLs itself
    (no cleanup of any kind runs) at the `kill_at_clip`-th optimizer step, i.e. the nth call of
    `clip_owner`.clip_grad_norm_ (the training loop's: accelerate's, which from 1.16 no longer
    calls torch's; packed training's: torch.nn.utils), or wherever `body` calls `die()`; assert
    that it was killed."""
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import accelerate, json, os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        if {kill_at_clip!r} is not None:
            clip_owner = {clip_owner}
            original_clip, clip_calls = clip_owner.clip_grad_norm_, [0]
            def clip(*a, **k):
                clip_calls[0] += 1
                if clip_calls[0] == {kill_at_clip!r}:
                    die()
                return original_clip(*a, **k)
            clip_owner.clip_grad_norm_ = clip
    """) + textwrap.dedent(body))
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _write_tokenizer(folder: Path, *, decoder: bool) -> None:
    """A character-level WordPiece tokenizer: every text tokenizes, no download needed."""
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    if decoder:
        tok.eos_token = "[SEP]"
        tok.bos_token = "[CLS]"
    tok.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def write_tiny_encoder(folder: Path, hidden: int = 32) -> str:
    """A 2-layer BERT of width `hidden` (4 heads, feed-forward 2 x hidden) with its tokenizer."""
    from transformers import BertConfig, BertModel

    _write_tokenizer(folder, decoder=False)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=2 * hidden,
                        max_position_embeddings=256)
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    _write_tokenizer(folder, decoder=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=3,
                         bos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def cls_files(tmp_path) -> tuple[str, str]:
    """A small, learnable sentiment set in the SST-2 TSV format."""
    return write_cls_files(tmp_path)


def write_cls_files(folder: Path) -> tuple[str, str]:
    pos = ["good fun", "great film", "a joy", "lovely and warm", "so good", "great fun"]
    neg = ["bad mess", "awful film", "a bore", "dull and cold", "so bad", "awful mess"]
    rows = [f"{t}\t1" for t in pos] + [f"{t}\t0" for t in neg]
    train = folder / "train.tsv"
    dev = folder / "dev.tsv"
    train.write_text("text\tlabel\n" + "\n".join(rows * 4) + "\n")
    dev.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return str(train), str(dev)


def tiny_config(model_path: str, train_file: str, dev_file: str, out: Path, **sections):
    """A RunConfig for a few-second run on a tiny model."""
    from adaptune.config import compose

    base = {"model": {"name": model_path, "max_length": 32},
            "data": {"task": "classification", "dataset": "custom", "train_path": train_file,
                     "dev_path": dev_file},
            "train": {"max_steps": 6, "batch_size": 8, "lr": 5e-3, "eval_batch_size": 16,
                      "precision": "fp32", "warmup_ratio": 0.0, "num_threads": 1},
            "output_dir": str(out)}
    return compose(base, sections)


def dev_accuracy_of_predictions(predictor, dev_file: str) -> float:
    """Accuracy of `predictor.predict` on a TSV dev file: what the run reports as dev accuracy
    when prediction and evaluation agree."""
    rows = [line.split("\t") for line in Path(dev_file).read_text().splitlines()[1:] if line]
    predictions = predictor.predict([text for text, _ in rows])
    return sum(p == label for p, (_, label) in zip(predictions, rows)) / len(rows)


def metric_from_example_stats(metrics: dict, task_name: str) -> float:
    """The main dev metric recomputed from the run's per-example statistics (what a report's
    dev-set bootstrap resamples): it must equal the metric the run reported."""
    import numpy as np

    from adaptune.tasks import task_class

    stats = np.asarray(metrics["dev_example_stats"], dtype=float)
    return task_class(task_name)().metric_from_stats(stats.sum(0), len(stats))


def tiny_grid(model: str, cls_files, **changes) -> dict:
    """A sweep grid (plain data) of few-second cells on a tiny model and the sentiment files."""
    train, dev = cls_files
    grid = {"name": "tiny", "task": "classification", "models": [model],
            "methods": ["lora", "head"], "ranks": [2, 4], "seeds": [0],
            "overrides": {"model": {"max_length": 32},
                          "data": {"dataset": "custom", "train_path": train, "dev_path": dev},
                          "train": {"max_steps": 4, "batch_size": 8, "lr": 5e-3,
                                    "precision": "fp32", "warmup_ratio": 0.0}}}
    grid.update(changes)
    return grid
