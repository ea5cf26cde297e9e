"""The Python API: finetune -> load -> predict, on a tiny model."""

from __future__ import annotations

import pytest

import adaptune
from adaptune.errors import ModelError


def test_finetune_then_predict(tiny_encoder, cls_files, tmp_path):
    train, dev = cls_files
    result = adaptune.finetune(tiny_encoder, task="classification", dataset="custom",
                               method="lora", rank=2, train_path=train, dev_path=dev,
                               max_steps=4, precision="fp32", output_dir=str(tmp_path / "r"),
                               train={"num_threads": 1})
    assert result.metrics["optimizer_steps"] == 4
    assert (result.output_dir / "config.json").exists()
    preds = adaptune.load(result.adapter_dir).predict(["good fun", ("a bore")])
    assert len(preds) == 2 and set(preds) <= {"0", "1"}


def test_load_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ModelError, match="not an adaptune adapter folder"):
        adaptune.load(tmp_path)
