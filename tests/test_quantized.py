"""4-/8-bit frozen bases through bitsandbytes (on the CPU from bitsandbytes 0.50, else CUDA):
training on them, and merging an adapter into them, which is refused unless asked to
de-quantize (and re-quantize), and then reports the error it adds."""

from __future__ import annotations

import sys

import pytest
import torch

from adaptune import api
from adaptune.errors import ConfigError, ModelError
from adaptune.modeling import BNB_CPU_VERSION
from adaptune.train import run
from conftest import (dev_accuracy_of_predictions, tiny_config, write_cls_files,
                      write_tiny_encoder)


def _bnb_usable() -> bool:
    try:
        import bitsandbytes
    except ImportError:
        return False
    version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2])
    return torch.cuda.is_available() or version >= BNB_CPU_VERSION


bnb = pytest.mark.skipif(not _bnb_usable(), reason="needs bitsandbytes >= 0.50 or a CUDA GPU")


def test_quantization_without_bitsandbytes_is_a_clear_error(tiny_encoder, cls_files, tmp_path,
                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if absent
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "q", model={"quantization": "4bit"})
    with pytest.raises(ConfigError, match="model.quantization=4bit needs the bitsandbytes"):
        run(cfg)


def test_an_old_bitsandbytes_on_the_cpu_is_a_clear_error(tiny_encoder, cls_files, tmp_path,
                                                         monkeypatch):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "q", model={"quantization": "8bit"})
    with pytest.raises(ConfigError, match="needs a CUDA GPU with bitsandbytes 0.45.0 .* CPU "
                                          "backend starts at 0.50"):
        run(cfg)


@pytest.fixture(scope="module")
def tiny_encoder_64(tmp_path_factory) -> str:
    """The tiny encoder at hidden size 64: bitsandbytes' CPU 4-bit kernels need layers at least
    one quantization block (64) wide."""
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-64"), hidden=64)


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def quantized_run(request, tiny_encoder_64, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"q{request.param}")
    train, dev = write_cls_files(folder)
    result = run(tiny_config(tiny_encoder_64, train, dev, folder / "run",
                             model={"quantization": request.param}, method={"rank": 4},
                             train={"precision": "bf16", "max_steps": 8, "lr": 2e-2}))
    return request.param, result, dev


@bnb
def test_lora_on_a_quantized_base(quantized_run):
    quantization, result, dev = quantized_run
    m = result.metrics
    assert m["trainable_params"] == 2 * 2 * 4 * (64 + 64) + (64 * 2 + 2)
    assert m["precision"] == "bf16"
    predictor = api.load(result.adapter_dir)
    assert predictor.merge_report is None
    # peft took its bitsandbytes LoRA layer (the one that can merge), not the plain Linear one:
    # it does so only if the model it wraps says it is quantized, which the task model relays.
    from peft.tuners.lora import bnb as lora_bnb

    kind = {"4bit": lora_bnb.Linear4bit, "8bit": lora_bnb.Linear8bitLt}[quantization]
    assert sum(isinstance(m, kind) for m in predictor.model.modules()) == 2 * 2
    assert dev_accuracy_of_predictions(predictor, dev) == m["dev"]["accuracy"]


@bnb
def test_merging_into_a_quantized_base_needs_to_be_asked(quantized_run):
    quantization, result, _ = quantized_run
    with pytest.raises(ModelError, match=f"loaded in {quantization} .* refused .*"
                                         "quantized_merge='dequantize'"):
        api.load(result.adapter_dir, merge=True)
    with pytest.raises(ConfigError, match="quantized_merge='fold': expected one of refuse"):
        api.load(result.adapter_dir, merge=True, quantized_merge="fold")


@bnb
@pytest.mark.parametrize("how", ["dequantize", "requantize"])
def test_a_quantized_merge_reports_the_error_it_adds(quantized_run, how):
    import bitsandbytes as bnb_lib
    from peft.tuners.lora import LoraLayer

    quantization, result, dev = quantized_run
    unmerged = api.load(result.adapter_dir)
    merged = api.load(result.adapter_dir, merge=True, quantized_merge=how)
    report = merged.merge_report
    assert report["quantized_merge"] == how and report["quantization"] == quantization
    modules = list(merged.model.modules())
    assert not any(isinstance(m, LoraLayer) for m in modules)  # the adapter is folded in
    quantized_layers = (bnb_lib.nn.Linear4bit, bnb_lib.nn.Linear8bitLt)
    assert any(isinstance(m, quantized_layers) for m in modules) == (how == "requantize")
    assert getattr(merged.model, "is_quantized", False) == (how == "requantize")
    # The merged model behaves like the adapted quantized one: small output changes against
    # the outputs' own size, the same decisions nearly everywhere (measured on random tokens).
    # De-quantizing leaves the computation as it was up to float rounding (measured ~2e-4 of
    # the outputs' size); quantizing the sum again rounds it (measured ~4% at 4 bits).
    bound = {"dequantize": 0.01, "requantize": 0.25}[how]
    assert 0 <= report["mean_abs_output_change"] <= bound * report["reference_mean_abs_output"]
    assert report["max_abs_output_change"] >= report["mean_abs_output_change"]
    assert report["argmax_agreement"] >= 0.75
    texts = [line.split("\t")[0] for line in open(dev).read().splitlines()[1:]]
    agree = sum(a == b for a, b in zip(merged.predict(texts), unmerged.predict(texts)))
    assert agree >= 0.75 * len(texts)
