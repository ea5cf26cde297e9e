"""The Python API: finetune -> load -> predict, on a tiny model."""

from __future__ import annotations

import pytest

import adaptune
from adaptune.errors import ConfigError, ModelError
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


def test_finetune_config_is_the_run_finetune_would_start(tmp_path):
    config = adaptune.finetune_config("minilm-l3", task="ner", rank=4, lr=3e-4,
                                      train={"seed": 7}, output_dir=str(tmp_path))
    assert (config.model.name, config.data.task, config.data.dataset) == ("minilm-l3", "ner",
                                                                         "conll2003")
    assert (config.method.rank, config.train.lr, config.train.seed) == (4, 3e-4, 7)
    assert not (tmp_path / "config.json").exists()  # nothing run, nothing written
    with pytest.raises(ConfigError, match="lrr"):
        adaptune.finetune_config("minilm-l3", train={"lrr": 1e-3})


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


def test_backbone_dropout_is_an_option_and_recorded(tiny_encoder, tiny_decoder, cls_files,
                                                     tmp_path):
    """model.dropout sets every dropout rate of the backbone's config (so its dropout layers and
    the rate handed to the attention kernel), leaves the task head's own dropout alone, is
    recorded in metrics.json, and a value that is not a rate is refused before training."""
    import torch

    from adaptune.config import compose
    from adaptune.errors import ConfigError
    from adaptune.modeling import dropout_keys, load_backbone

    def masks_differ(backbone) -> bool:
        """Whether two training-mode passes over one input differ (dropout is drawing)."""
        backbone.train()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            one, two = (backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                        for _ in range(2))
        return not torch.equal(one, two)

    kept = load_backbone(tiny_encoder, "encoder")
    off = load_backbone(tiny_encoder, "encoder", dropout="0")
    assert dropout_keys(kept.config) == ["attention_probs_dropout_prob", "hidden_dropout_prob"]
    assert kept.config.hidden_dropout_prob == 0.1 and masks_differ(kept)
    assert all(getattr(off.config, k) == 0.0 for k in dropout_keys(off.config))
    assert not masks_differ(off)
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, torch.nn.Dropout))
    # Llama-style configs name theirs otherwise.
    decoder = load_backbone(tiny_decoder, "decoder", dropout="0.2")
    assert "attention_dropout" in dropout_keys(decoder.config)
    assert decoder.config.attention_dropout == 0.2

    # Through the API's shortcut (`dropout=` is LoRA's).
    train, dev = cls_files
    result = adaptune.finetune(tiny_encoder, dataset="custom", train_path=train, dev_path=dev,
                               max_steps=2, max_length=32, precision="fp32", backbone_dropout=0,
                               output_dir=str(tmp_path / "off"), train={"num_threads": 1})
    assert result.config.model.dropout == "0" and result.config.method.dropout == 0.0
    assert result.metrics["backbone_dropout"] == {"attention_probs_dropout_prob": 0.0,
                                                 "hidden_dropout_prob": 0.0}
    head = adaptune.load(tmp_path / "off" / "adapter").model.task_head
    assert {m.p for m in head.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    for bad in ("high", "1.5", -0.1):
        with pytest.raises(ConfigError, match="model.dropout"):
            compose({"model": {"dropout": bad}})


@pytest.mark.parametrize("method, kept", [("lora", False), ("head", False), ("full", True),
                                          ("bitfit", True)])
def test_auto_backbone_dropout_is_off_only_for_a_frozen_backbone(tiny_encoder, method, kept):
    """model.dropout=auto (the default) turns the backbone's dropout off where the method
    leaves its weights frozen, and keeps the checkpoint's where it trains them; "checkpoint"
    keeps it everywhere, and a config stored before the option existed means "checkpoint"."""
    from adaptune.config import compose, from_dict, to_dict, upgrade_stored
    from adaptune.spec import resolve

    config = compose({"model": {"name": tiny_encoder}, "method": {"name": method}})
    assert config.model.dropout == "auto"
    assert resolve(config).backbone_dropout == ("checkpoint" if kept else "0")
    assert resolve(config.replace(model={"dropout": "checkpoint"})).backbone_dropout == \
        "checkpoint"
    older = to_dict(config)
    del older["model"]["dropout"]
    assert from_dict(upgrade_stored(older)).model.dropout == "checkpoint"
