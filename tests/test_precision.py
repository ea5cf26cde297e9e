"""train.precision=auto by measurement (adaptune.precision): the choice under both simulated
outcomes, the cache, the fallback without a probe, and a probe that leaves the run unchanged."""

from __future__ import annotations

import json

import pytest
import torch

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
    assert picked == "fp32" and record["source"] == "measured now"
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
    assert picked == "bf16" and record["source"] == "cached measurement" and len(calls) == 1
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
    assert choice["picked"] == "fp32" == auto["precision"] and choice["source"] == "measured now"
    assert choice["probe"]["fp32_s"] > 0 and choice["probe"]["bf16_s"] > 0
    # What the decision cost is recorded: at least two of each precision's three timed passes
    # take their median or longer.
    assert choice["seconds"] >= 2 * (choice["probe"]["fp32_s"] + choice["probe"]["bf16_s"])
    assert auto["attention_choice"]["seconds"] >= 0 and auto["compile_choice"]["seconds"] >= 0
    for key in ("dev", "final_train_loss", "evaluations", "optimizer_steps"):
        assert auto[key] == fixed[key], key


def test_a_run_takes_bf16_when_the_probe_says_so(tiny_encoder, cls_files, tmp_path, cache,
                                                 monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda model, batches, device, kernels, switch: {
        "fp32_s": 2.0, "bf16_s": 1.0, **precision.batch_facts(batches)})
    train, dev = cls_files
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "b",
                        train={"precision": "auto"})).metrics
    assert m["precision"] == "bf16" and m["precision_choice"]["picked"] == "bf16"


# ---------------------------------------------------------------------------------------------
# train.compile=auto (adaptune.compiling).


def test_compile_auto_on_and_off_by_predicted_steps(cache):
    from adaptune import compiling

    calls: list = []

    def measure():
        calls.append(1)  # 0.1 s saved per step, 60 s to compile: pays from 600 steps
        return {"eager_s": 1.0, "compiled_s": 0.9, "compile_s": 60.0, "blocks": 1}

    shape = {"model": "m", "steps_kind": "test"}
    on, record = compiling.decide("auto", steps=100, device="cpu", key_parts=shape,
                                  measure_fn=measure)
    assert not on and calls == [] and "stay eager" in record["why"]  # short: not even measured
    on, record = compiling.decide("auto", steps=5000, device="cpu", key_parts=shape,
                                  measure_fn=measure)
    assert on and calls == [1] and record["predicted_saving_s"] == pytest.approx(440.0)
    # The measurement is cached: a 300-step run of that shape is predicted to lose 30 s.
    on, record = compiling.decide("auto", steps=300, device="cpu", key_parts=shape,
                                  measure_fn=measure)
    assert not on and calls == [1] and record["source"] == "cached measurement"
    assert compiling.decide("auto", steps=700, device="cpu", key_parts=shape,
                            measure_fn=measure)[0]
    assert compiling.decide("on", steps=1, device="cpu", key_parts=shape,
                            measure_fn=measure)[0]
    assert not compiling.decide("off", steps=10**9, device="cpu", key_parts=shape,
                                measure_fn=measure)[0]


def test_a_measured_compile_that_does_not_pay_is_undone():
    from transformers import BertConfig, BertModel

    from adaptune import compiling
    from adaptune.modeling import compile_blocks

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32))
    assert compile_blocks(bert) == 2
    compiling.uncompile(bert)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in bert.modules())


def test_train_compile_takes_on_off_auto_and_the_former_booleans(tmp_path):
    from adaptune.config import compose, upgrade_stored
    from adaptune.errors import ConfigError

    assert compose({"train": {"compile": True}}).train.compile == "on"
    assert compose(overrides=["train.compile=false"]).train.compile == "off"
    assert compose(overrides=["train.compile=auto"]).train.compile == "auto"
    with pytest.raises(ConfigError, match="train.compile: expected one of off, on, auto"):
        compose(overrides=["train.compile=sometimes"])
    assert upgrade_stored({"train": {"compile": True}})["train"]["compile"] == "on"


# ---------------------------------------------------------------------------------------------
# model.attention=auto (adaptune.attention): sdpa or eager by measurement, eager's memory bounded.

ROOMY = {"eager_bytes": 10 * 2**20, "available": 10 * 2**30}  # 10 MB extra of 10 GB free


def _timings(sdpa: float, eager: float, calls: list):
    def measure():
        calls.append(1)
        return {"sdpa_s": sdpa, "eager_s": eager, "tokens": 1024}
    return measure


def _decide(measure_fn, key=KEY, *, requested="auto", loaded="sdpa", steps=1000, **memory):
    from adaptune import attention

    return attention.decide(requested, loaded=loaded, switchable=True, steps=steps,
                            device="cpu", key_parts=key, measure_fn=measure_fn,
                            **(memory or ROOMY))


def test_attention_auto_picks_the_kernel_measured_faster(cache):
    calls: list = []
    picked, record = _decide(_timings(1.10, 1.00, calls))
    assert picked == "eager" and record["source"] == "measured now" and "1.10x" in record["why"]
    # Eager 1% faster is under the margin: sdpa; eager slower (a GPU, long sequences): sdpa.
    assert _decide(_timings(1.01, 1.00, calls), {**KEY, "threads": 1})[0] == "sdpa"
    assert _decide(_timings(1.00, 2.00, calls), {**KEY, "threads": 3})[0] == "sdpa"
    assert len(calls) == 3
    # Cached per device and run shape: the next run of that shape does not measure.
    picked, record = _decide(_timings(1.00, 9.00, calls))
    assert picked == "eager" and record["source"] == "cached measurement" and len(calls) == 3
    # Several processes (no measurement possible) read the cache too...
    assert _decide(None)[0] == "eager"
    # ...and keep transformers' choice where nothing is cached.
    picked, record = _decide(None, {**KEY, "threads": 9})
    assert picked == "sdpa" and "several processes" in record["why"]


def test_attention_auto_keeps_transformers_choice_where_it_should_not_measure(cache):
    calls: list = []
    eager_faster = _timings(2.0, 1.0, calls)
    assert _decide(eager_faster, requested="sdpa")[1]["why"] == "asked for"
    assert _decide(eager_faster, requested="eager", loaded="eager")[0] == "eager"
    # An architecture transformers loaded with eager (no sdpa) offers no choice.
    assert _decide(eager_faster, loaded="eager")[0] == "eager"
    # A short run with nothing cached: a measurement would cost what it could gain.
    picked, record = _decide(eager_faster, steps=50)
    assert picked == "sdpa" and "50 steps" in record["why"]
    # Eager's memory for the longest batch over the share of what is free: never tried.
    picked, record = _decide(eager_faster, eager_bytes=3 * 2**30, available=10 * 2**30)
    assert picked == "sdpa" and "3,072 MB more" in record["why"]
    picked, record = _decide(eager_faster, eager_bytes=-1, available=10 * 2**30)
    assert picked == "sdpa" and "cannot be bounded" in record["why"]
    assert calls == []


class _PadTask:
    """collate as the tasks do it: right padding, a mask of the real tokens."""

    @staticmethod
    def collate(features, pad_token_id):
        width = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [pad_token_id] * (width - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                for f in features]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def test_probes_take_a_padded_and_an_unpadded_batch_weighted_by_their_shares():
    from adaptune.batching import LengthGroupedBatches
    from adaptune.precision import probe_batches

    # 12 sentences of length 5 (batches of 4 without padding) and 8 of mixed lengths.
    lengths = [5] * 12 + [3, 7, 4, 8, 6, 9, 2, 10]
    features = [{"input_ids": [1] * n} for n in lengths]
    sampler = LengthGroupedBatches(lengths, 4, 0, False)  # random batches: both kinds occur
    kinds = {}
    for batch in sampler.batches(0):
        kinds.setdefault(len({lengths[i] for i in batch}) > 1, []).append(batch)
    probes = probe_batches(_PadTask, features, sampler, 0, "cpu")
    assert len(probes) == len(kinds) and abs(sum(w for _, w in probes) - 1) < 1e-9
    for batch, weight in probes:
        padded = not bool(batch["attention_mask"].all())
        assert weight == len(kinds[padded]) / 5
    # One kind only: one batch of weight 1.
    same = [{"input_ids": [1] * 5}] * 8
    (batch, weight), = probe_batches(_PadTask, same, LengthGroupedBatches([5] * 8, 4, 0, True),
                                     0, "cpu")
    assert weight == 1 and batch["attention_mask"].all()


def test_attention_measurement_weights_each_kind_of_batch(monkeypatch):
    """The case that made a single median batch mislead: eager ties sdpa on the batch without
    padding and is faster on the padded one; the weighted figures show eager ahead."""
    from adaptune import attention

    current = {"kernel": "sdpa"}
    monkeypatch.setattr(attention, "set_kernel", lambda model, name: current.update(kernel=name))
    seconds = {("sdpa", False): 0.47, ("eager", False): 0.47,
               ("sdpa", True): 0.53, ("eager", True): 0.41}
    monkeypatch.setattr(precision, "timed_pass", lambda model, batch, device, bf16: seconds[
        current["kernel"], not bool(batch["attention_mask"].all())])
    full = {"attention_mask": torch.ones(16, 8, dtype=torch.long)}
    padded = {"attention_mask": torch.tensor([[1] * 9] * 15 + [[1] * 5 + [0] * 4])}
    figures = attention.measure(None, [(full, 0.55), (padded, 0.45)], "cpu")
    assert abs(figures["sdpa_s"] - (0.55 * 0.47 + 0.45 * 0.53)) < 1e-9
    assert abs(figures["eager_s"] - (0.55 * 0.47 + 0.45 * 0.41)) < 1e-9
    assert figures["padded_share"] == 0.45 and figures["tokens"] == 16 * 8 + 16 * 9
    assert current["kernel"] == "sdpa"  # left as loaded
    assert attention.faster(figures, "sdpa", "eager", attention.MARGIN, "measured now")[0] \
        == "eager"
    # The unpadded batch alone, as the single-batch probe saw it: a tie, so sdpa.
    alone = attention.measure(None, [(full, 1.0)], "cpu")
    assert attention.faster(alone, "sdpa", "eager", attention.MARGIN, "measured now")[0] == "sdpa"


# Seconds of a pass on this project's Intel Xeon (AMX), NER job, by (kernel, bf16, padded):
# sdpa's masked path loses in bf16, eager's gains 1.5x (measured in session 24, rounded).
XEON_NER = {("sdpa", False, False): 0.120, ("sdpa", True, False): 0.105,
            ("sdpa", False, True): 0.236, ("sdpa", True, True): 0.267,
            ("eager", False, False): 0.127, ("eager", True, False): 0.105,
            ("eager", False, True): 0.237, ("eager", True, True): 0.156}
UNPADDED = {"attention_mask": torch.ones(32, 11, dtype=torch.long)}
PADDED = {"attention_mask": torch.tensor([[1] * 24] * 31 + [[1] * 20 + [0] * 4])}


def _simulated_passes(monkeypatch, seconds):
    """timed_pass returns `seconds` by the kernel last switched to, the precision and whether
    the batch is padded (no forward pass runs)."""
    from adaptune import attention

    current, real = {"kernel": "sdpa"}, attention.set_kernel

    def set_kernel(model, name):
        current.update(kernel=name)
        return real(model, name) if model is not None else True

    monkeypatch.setattr(attention, "set_kernel", set_kernel)
    monkeypatch.setattr(precision, "timed_pass", lambda model, batch, device, bf16: seconds[
        current["kernel"], bf16, not bool(batch["attention_mask"].all())])
    return current


def test_precision_and_kernel_are_measured_together_where_they_interact(monkeypatch, cache):
    """bf16 loses with sdpa on padded batches and wins with eager: judged in sdpa alone (the
    kernel transformers loads), fp32 would be kept; judged with each precision's faster kernel,
    bf16 with eager is 1.4x faster than anything in fp32, and the kernel then follows."""
    from adaptune import attention

    current = _simulated_passes(monkeypatch, XEON_NER)
    batches = [(UNPADDED, 0.37), (PADDED, 0.63)]
    alone = precision.measure(None, batches, "cpu")  # the model's own kernel: sdpa
    assert precision.faster(alone, "fp32", "bf16", precision.MARGIN, "x")[0] == "fp32"
    joint = precision.measure(None, batches, "cpu", attention.COMPARED, attention.set_kernel)
    assert current["kernel"] == "sdpa"  # put back
    assert joint["fp32_s"] == pytest.approx(0.37 * 0.120 + 0.63 * 0.236)  # sdpa, fp32's best
    assert joint["bf16_s"] == pytest.approx(0.37 * 0.105 + 0.63 * 0.156)  # eager, bf16's best
    picked, record = precision.choose("auto", device="cpu", key_parts=KEY,
                                      probe=lambda: joint, non_embedding_params=1)
    assert picked == "bf16" and "faster of the attention kernels eager, sdpa" in record["why"]
    kernels = attention.from_precision_probe(record["probe"], picked)
    assert attention.faster(kernels, "sdpa", "eager", attention.MARGIN, "x")[0] == "eager"
    assert attention.from_precision_probe(alone, "bf16") is None  # one kernel timed


def test_a_long_run_measures_precision_and_kernel_in_one_probe(tiny_encoder, cls_files,
                                                               tmp_path, cache, monkeypatch):
    from adaptune import attention

    _simulated_passes(monkeypatch, XEON_NER)
    monkeypatch.setattr(attention, "UNMEASURED_MIN_STEPS", 0)
    monkeypatch.setattr(attention, "measure", lambda *a, **k: pytest.fail("measured twice"))
    train, dev = cls_files
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "j",
                        train={"precision": "auto"})).metrics
    assert m["precision"] == "bf16" and m["attention"] == "eager", m["attention_choice"]
    assert m["attention_choice"]["figures"]["from"] == "the precision probe"
    assert sorted(m["precision_choice"]["probe"]["by_kernel"]) == ["eager", "sdpa"]
    # A run too short to measure the kernel times one kernel only, and keeps sdpa.
    monkeypatch.setattr(attention, "UNMEASURED_MIN_STEPS", 10**6)
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "s",
                        train={"precision": "auto"})).metrics
    assert m["attention"] == "sdpa" and "by_kernel" not in m["precision_choice"]["probe"]


def test_eager_memory_bound_grows_with_the_square_of_the_length():
    from transformers import BertConfig

    from adaptune.attention import eager_extra_bytes

    config = BertConfig(num_hidden_layers=6, num_attention_heads=12)
    short, long = eager_extra_bytes(config, 32, 128), eager_extra_bytes(config, 32, 512)
    assert long == 16 * short and 250 * 2**20 < short < 350 * 2**20  # NER: +350 MB measured


def test_a_run_trains_with_the_kernel_the_measurement_picks(tiny_encoder, cls_files, tmp_path,
                                                           cache, monkeypatch):
    from adaptune import attention

    monkeypatch.setattr(attention, "UNMEASURED_MIN_STEPS", 0)
    monkeypatch.setattr(attention, "measure", lambda model, batches, device, bf16: {
        "sdpa_s": 2.0, "eager_s": 1.0, "tokens": sum(int(b["attention_mask"].numel())
                                                      for b, _ in batches)})
    train, dev = cls_files
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "e")).metrics
    assert m["attention"] == "eager" and m["attention_choice"]["picked"] == "eager"
    assert m["compile_choice"]["compiled"] is False
    # With eager's memory over the share it is never measured: sdpa.
    monkeypatch.setattr(attention, "MEMORY_SHARE", 1e-12)
    m = run(tiny_config(tiny_encoder, train, dev, tmp_path / "s",
                        train={"batch_size": 4})).metrics
    assert m["attention"] == "sdpa" and "memory" in m["attention_choice"]["why"]


def test_the_attention_measurement_leaves_the_run_as_it_would_have_been(tiny_encoder, cls_files,
                                                                       tmp_path, cache,
                                                                       monkeypatch):
    """A real measurement (dropout on, so it draws random numbers) that ends in sdpa trains the
    same run, to the last bit, as model.attention=sdpa; its figures are in metrics.json."""
    from adaptune import attention

    train, dev = cls_files
    fixed = run(tiny_config(tiny_encoder, train, dev, tmp_path / "sdpa",
                            model={"attention": "sdpa", "dropout": "checkpoint"})).metrics
    monkeypatch.setattr(attention, "UNMEASURED_MIN_STEPS", 0)
    monkeypatch.setattr(attention, "MARGIN", float("inf"))  # measure, then keep sdpa
    auto = run(tiny_config(tiny_encoder, train, dev, tmp_path / "auto",
                           model={"dropout": "checkpoint"})).metrics
    choice = auto["attention_choice"]
    assert choice["picked"] == "sdpa" == auto["attention"] and choice["source"] == "measured now"
    assert choice["figures"]["sdpa_s"] > 0 and choice["figures"]["eager_s"] > 0
    for key in ("dev", "final_train_loss", "evaluations", "optimizer_steps"):
        assert auto[key] == fixed[key], key
