"""train.precision=auto by measurement (adaptune.precision): the choice under both simulated
outcomes, the cache, the fallback without a probe, and a probe that leaves the run unchanged."""

from __future__ import annotations

import json

import pytest

from adaptune import precision
from adaptune.train import run
from conftest import tiny_config

KEY = {"model": "m", "method": "lora", "task": "ner", "batch_size": 32, "threads": 2}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    return tmp_path / "cache" / "precision.json"


def _probe(fp32: float, bf16: float, calls: list):
    def probe():
        calls.append(1)
        return {"fp32_s": fp32, "bf16_s": bf16, "tokens": 1024}
    return probe


def test_bf16_is_picked_only_when_it_is_measured_faster(cache):
    calls: list = []
    picked, record = precision.choose("auto", device="cpu", key_parts=KEY,
                                      probe=_probe(1.0, 0.5, calls), non_embedding_params=1)
    assert picked == "bf16" and record["probe"]["bf16_s"] == 0.5 and "2.00x" in record["why"]
    # Another machine (another cache key): bf16 only 5% faster, under the margin -> fp32.
    picked, record = precision.choose("auto", device="cpu", key_parts={**KEY, "threads": 1},
                                      probe=_probe(1.0, 0.95, calls), non_embedding_params=1)
    assert picked == "fp32" and record["source"] == "probe"
    # ...and where bf16 is slower (this project's first CPU), fp32 as well.
    picked, _ = precision.choose("auto", device="cpu", key_parts={**KEY, "threads": 3},
                                 probe=_probe(1.0, 2.0, calls), non_embedding_params=1)
    assert picked == "fp32" and len(calls) == 3


def test_the_answer_is_cached_per_device_and_run_shape(cache):
    calls: list = []
    precision.choose("auto", device="cpu", key_parts=KEY, probe=_probe(1.0, 0.5, calls),
                     non_embedding_params=1)
    picked, record = precision.choose("auto", device="cpu", key_parts=KEY,
                                      probe=_probe(1.0, 9.0, calls), non_embedding_params=1)
    assert picked == "bf16" and record["source"] == "cached probe" and len(calls) == 1
    stored = json.loads(cache.read_text())
    (key,) = stored
    assert json.loads(key)["device"].startswith("cpu:") and json.loads(key)["torch"]
    cache.write_text("{not json")  # a damaged cache is measured again
    picked, _ = precision.choose("auto", device="cpu", key_parts=KEY,
                                 probe=_probe(1.0, 9.0, calls), non_embedding_params=1)
    assert picked == "fp32" and len(calls) == 2


def test_without_a_probe_the_cache_or_the_fallback_rule(cache, monkeypatch):
    picked, record = precision.choose("auto", device="cpu", key_parts=KEY, probe=None,
                                      non_embedding_params=10**9)
    assert picked == "fp32" and "fallback" in record["why"]
    precision.choose("auto", device="cpu", key_parts=KEY, probe=_probe(1.0, 0.5, []),
                     non_embedding_params=1)
    assert precision.choose("auto", device="cpu", key_parts=KEY, probe=None,
                            non_embedding_params=1)[0] == "bf16"
    assert precision.choose("fp32", device="cpu", key_parts=KEY, probe=None,
                            non_embedding_params=1) == ("fp32", {"requested": "fp32",
                                                                 "picked": "fp32",
                                                                 "why": "asked for"})
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.choose("auto", device="cpu", key_parts={**KEY, "threads": 7},
                            probe=_probe(1.0, 0.1, []), non_embedding_params=1)[0] == "fp32"


def test_the_probe_leaves_the_run_exactly_as_it_would_have_been(tiny_encoder, cls_files,
                                                                 tmp_path, cache, monkeypatch):
    """A real probe (dropout on, so it draws random numbers) that ends in fp32 trains the same
    run, to the last bit, as train.precision=fp32; the figures are in metrics.json."""
    train, dev = cls_files
    fixed = run(tiny_config(tiny_encoder, train, dev, tmp_path / "fp32")).metrics
    monkeypatch.setattr(precision, "MARGIN", float("inf"))  # measure, then keep fp32
    auto = run(tiny_config(tiny_encoder, train, dev, tmp_path / "auto",
                           train={"precision": "auto"})).metrics
    choice = auto["precision_choice"]
    assert choice["picked"] == "fp32" == auto["precision"] and choice["source"] == "probe"
    assert choice["probe"]["fp32_s"] > 0 and choice["probe"]["bf16_s"] > 0
    for key in ("dev", "final_train_loss", "evaluations", "optimizer_steps"):
        assert auto[key] == fixed[key], key


def test_a_run_takes_bf16_when_the_probe_says_so(tiny_encoder, cls_files, tmp_path, cache,
                                                 monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda model, batch, device: {
        "fp32_s": 2.0, "bf16_s": 1.0, "tokens": int(batch["attention_mask"].numel())})
    train, dev = cls_files
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "b",
                        train={"precision": "auto"})).metrics
    assert m["precision"] == "bf16" and m["precision_choice"]["picked"] == "bf16"
