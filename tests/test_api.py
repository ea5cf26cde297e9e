"""The Python API: finetune -> load -> predict, on a tiny model."""

from __future__ import annotations

import pytest

import adaptune
from adaptune.errors import ModelError
from conftest import dev_accuracy_of_predictions, metric_from_example_stats


def test_finetune_then_predict(tiny_encoder, cls_files, tmp_path):
    train, dev = cls_files
    result = adaptune.finetune(tiny_encoder, task="classification", dataset="custom",
                               method="full", train_path=train, dev_path=dev, max_steps=24,
                               lr=2e-2, precision="fp32", output_dir=str(tmp_path / "r"),
                               train={"num_threads": 1, "eval_every": 24})
    assert result.metrics["optimizer_steps"] == 24
    assert (result.output_dir / "config.json").exists()
    # It learned the task (the untrained head scores 0.5), and prediction agrees with the
    # evaluation the run reported, example by example.
    accuracy = result.metrics["dev"]["accuracy"]
    assert accuracy >= 0.75
    assert metric_from_example_stats(result.metrics, "classification") == accuracy
    assert dev_accuracy_of_predictions(adaptune.load(result.adapter_dir), dev) == accuracy


def test_load_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ModelError, match="not an adaptune adapter folder"):
        adaptune.load(tmp_path)


def test_adapter_written_by_an_older_version_loads(tiny_encoder, cls_files, tmp_path):
    """adaptune.json of the flat method layout (AdaLoRA's options at method.*, before method
    sections) loads, and predicts what the current layout predicts."""
    import json

    options = adaptune.compose({"method": {"name": "adalora", "adalora": {"init_rank": 4}}})
    result = adaptune.finetune(tiny_encoder, dataset="custom", method="adalora", rank=2,
                               train_path=cls_files[0], dev_path=cls_files[1], max_steps=4,
                               precision="fp32", output_dir=str(tmp_path / "r"),
                               config=options, train={"num_threads": 1})
    texts = ["good fun", "a bore", "great film"]
    today = adaptune.load(result.adapter_dir).predict(texts)
    meta_file = result.adapter_dir / "adaptune.json"
    meta = json.loads(meta_file.read_text())
    method = meta["config"]["method"]
    method.update(method.pop("adalora"))
    meta_file.write_text(json.dumps(meta))
    older = adaptune.load(result.adapter_dir)
    assert older.meta.config.method.adalora.init_rank == 4
    assert older.predict(texts) == today


def test_attention_kernel_is_an_option_and_recorded(tiny_encoder, cls_files, tmp_path):
    """model.attention picks transformers' attention kernel; the run records the one in use,
    the same kernel (and output) comes back with the saved adapter, and a name transformers
    does not know is refused before training."""
    import torch

    from adaptune.config import compose
    from adaptune.errors import ConfigError
    from adaptune.train import run
    from conftest import tiny_config

    train, dev = cls_files
    default = run(tiny_config(tiny_encoder, train, dev, tmp_path / "auto")).metrics
    eager = run(tiny_config(tiny_encoder, train, dev, tmp_path / "eager",
                            model={"attention": "eager"})).metrics
    assert default["attention"] == "sdpa" and eager["attention"] == "eager"
    # Same weights, same data order: the two kernels compute the same function.
    assert eager["dev"]["accuracy"] == pytest.approx(default["dev"]["accuracy"], abs=0.1)
    loaded = adaptune.load(tmp_path / "eager" / "adapter")
    assert loaded.model.backbone.config._attn_implementation == "eager"
    with torch.no_grad():
        assert loaded.predict(["a b c"]) is not None
    with pytest.raises(ConfigError, match="model.attention"):
        compose({"model": {"attention": "flash"}})
