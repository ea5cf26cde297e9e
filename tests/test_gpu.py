"""GPU paths: bf16 autocast. Skipped without CUDA (CI); run on a GPU machine with
`python -m pytest tests/test_gpu.py`. 4-/8-bit bases: test_quantized.py (CPU or GPU)."""

from __future__ import annotations

import pytest
import torch

from adaptune.train import run
from conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_bf16_autocast_on_gpu(tiny_encoder, cls_files, tmp_path):
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "bf16",
                             train={"precision": "bf16", "max_steps": 8}))
    assert result.metrics["precision"] == "bf16" and result.metrics["peak_memory_mb"] > 0
