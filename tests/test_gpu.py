"""GPU paths: bf16 autocast and 4-/8-bit bases through bitsandbytes. Skipped without CUDA (CI);
run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from adaptune.errors import ConfigError
from adaptune.train import run
from conftest import dev_accuracy_of_predictions, tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_quantization_on_cpu_is_a_clear_error(tiny_encoder, cls_files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "q", model={"quantization": "4bit"})
    with pytest.raises(ConfigError, match="model.quantization=4bit needs a CUDA GPU"):
        run(cfg)


@cuda
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_on_a_quantized_base(quantization, tiny_encoder, cls_files, tmp_path):
    pytest.importorskip("bitsandbytes")
    from adaptune import api

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / quantization,
                             model={"quantization": quantization}, method={"rank": 4},
                             train={"precision": "bf16", "max_steps": 8}))
    m = result.metrics
    assert m["trainable_params"] == 2 * 2 * 4 * (32 + 32) + (32 * 2 + 2)
    assert m["precision"] == "bf16"
    predictor = api.load(result.adapter_dir)
    assert dev_accuracy_of_predictions(predictor, cls_files[1]) == m["dev"]["accuracy"]


@cuda
def test_bf16_autocast_on_gpu(tiny_encoder, cls_files, tmp_path):
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "bf16",
                             train={"precision": "bf16", "max_steps": 8}))
    assert result.metrics["precision"] == "bf16" and result.metrics["peak_memory_mb"] > 0
