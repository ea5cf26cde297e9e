"""Merging adapters trained on one base (peft's add_weighted_adapter) and serving several
adapters on one base with mixed batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaptune import api
from adaptune.errors import ConfigError, ModelError
from adaptune.merging import MultiAdapterPredictor, merge_adapters
from adaptune.train import run
from conftest import tiny_config

RANK = 4
TEXTS = ["good fun", "a bore", "so bad", "great film", "lovely and warm", "dull and cold"]


@pytest.fixture()
def two_adapters(tiny_encoder, cls_files, tmp_path):
    out = []
    for i, (seed, lr) in enumerate([(0, 5e-3), (1, 2e-2)]):
        result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / f"run{i}",
                                 method={"rank": RANK, "targets": ["query", "value"]},
                                 train={"seed": seed, "lr": lr, "max_steps": 8}))
        out.append(result.adapter_dir)
    return out


def _lora_layers(predictor):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in predictor.model.named_modules() if isinstance(m, LoraLayer)}


def _head(folder):
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if "task_head" in k}


def test_cat_merge_is_the_weighted_sum_of_the_updates(two_adapters, tmp_path):
    weights = [0.3, 0.7]
    out = merge_adapters(two_adapters, tmp_path / "merged", combination="cat", weights=weights,
                         head=1)
    parts = [_lora_layers(api.load(d)) for d in two_adapters]
    merged_predictor = api.load(out)
    merged = _lora_layers(merged_predictor)
    assert merged.keys() == parts[0].keys() and len(merged) == 4  # query, value x 2 layers
    for name, layer in merged.items():
        expected = sum(w * p[name].get_delta_weight("default") for w, p in zip(weights, parts))
        torch.testing.assert_close(layer.get_delta_weight("default"), expected,
                                   rtol=1e-5, atol=1e-7)
    meta = json.loads((out / "adaptune.json").read_text())
    assert meta["config"]["method"]["rank"] == 2 * RANK  # ranks add up
    # The kept head is adapter 1's, byte for byte; the merged folder loads with plain peft too.
    kept = _head(two_adapters[1])
    assert _head(out).keys() == kept.keys()
    assert all(torch.equal(_head(out)[k], kept[k]) for k in kept)
    from peft import PeftModel

    plain = PeftModel.from_pretrained(api.build_base(out), str(out))
    assert isinstance(plain, PeftModel)
    assert merged_predictor.predict(TEXTS) == api.Predictor(
        plain, merged_predictor.tokenizer, merged_predictor.meta).predict(TEXTS)
    assert json.loads((out / "merge.json").read_text())["combination"] == "cat"


def test_linear_merge_averages_the_factors_as_peft_defines_it(two_adapters, tmp_path):
    """peft's linear merge: A = sum sign * sqrt(|w s|) A_i, B = sum sqrt(|w s|) B_i, with the
    merged scaling 1: the factors are combined, so the update is not the weighted sum of the
    updates (that is `cat`); the test computes the factors by hand."""
    weights = [0.5, 0.5]
    out = merge_adapters(two_adapters, tmp_path / "linear", combination="linear",
                         weights=weights, head=0)
    parts = [_lora_layers(api.load(d)) for d in two_adapters]
    merged = _lora_layers(api.load(out))
    for name, layer in merged.items():
        a = sum(math.sqrt(w * p[name].scaling["default"]) * p[name].lora_A["default"].weight
                for w, p in zip(weights, parts))
        b = sum(math.sqrt(w * p[name].scaling["default"]) * p[name].lora_B["default"].weight
                for w, p in zip(weights, parts))
        torch.testing.assert_close(layer.lora_A["default"].weight, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B["default"].weight, b, rtol=1e-5, atol=1e-7)
        assert layer.scaling["default"] == pytest.approx(1.0)


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_run_and_keep_shapes(combination, two_adapters, tmp_path):
    torch.manual_seed(0)
    out = merge_adapters(two_adapters, tmp_path / combination, combination=combination,
                         weights=[1.0, 1.0], density=0.5, head=0)
    parts = _lora_layers(api.load(two_adapters[0]))
    merged = _lora_layers(api.load(out))
    for name, layer in merged.items():
        assert layer.lora_A["default"].weight.shape == parts[name].lora_A["default"].weight.shape
        assert layer.lora_B["default"].weight.shape == parts[name].lora_B["default"].weight.shape
    assert api.load(out).predict(TEXTS)  # a working adapter


def test_merge_refusals(two_adapters, tiny_encoder, cls_files, tmp_path):
    with pytest.raises(ConfigError, match="different task heads .* pass head=<index>"):
        merge_adapters(two_adapters, tmp_path / "m")
    with pytest.raises(ConfigError, match="combination 'svd' is not one of"):
        merge_adapters(two_adapters, tmp_path / "m", combination="svd", head=0)
    head_run = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "head",
                               method={"name": "head"}))
    with pytest.raises(ConfigError, match="is a head adapter; merging combines lora and dora"):
        merge_adapters([two_adapters[0], head_run.adapter_dir], tmp_path / "m", head=0)
    other_rank = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "r8",
                                 method={"rank": 8, "targets": ["query", "value"]}))
    with pytest.raises(ConfigError, match="linear needs equal ranks"):
        merge_adapters([two_adapters[0], other_rank.adapter_dir], tmp_path / "m",
                       combination="linear", head=0)
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_cli_merge(two_adapters, tmp_path, capsys):
    from adaptune import cli

    out = tmp_path / "cli"
    assert cli.main(["merge", str(out), *map(str, two_adapters), "--head", "0",
                     "--weights", "0.5,0.5"]) == 0
    assert api.load(out).predict(TEXTS[:2])
    assert cli.main(["merge", str(tmp_path / "x"), *map(str, two_adapters)]) == 2
    assert "pass head=<index>" in capsys.readouterr().err


def test_merging_into_a_quantized_base_is_refused(two_adapters, tmp_path):
    import shutil

    folder = tmp_path / "q"
    shutil.copytree(two_adapters[0], folder)
    meta = json.loads((folder / "adaptune.json").read_text())
    meta["config"]["model"]["quantization"] = "4bit"
    (folder / "adaptune.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="loaded in 4bit .* merging the adapter into quantized "
                                         "weights is refused"):
        api.load(folder, merge=True)


def test_a_mixed_batch_equals_each_adapters_own_predictions(two_adapters):
    many = MultiAdapterPredictor({"first": two_adapters[0], "second": two_adapters[1]})
    own = {name: api.load(d) for name, d in zip(("first", "second"), two_adapters)}
    names = ["first", "second", "second", "first", "second", "first"]
    mixed = many.predict(TEXTS, names)
    assert mixed == [own[n].predict([t])[0] for t, n in zip(TEXTS, names)]
    # The adapters really differ (else the test could not fail), and the base is shared.
    logits = {}
    for name in ("first", "second"):
        many.model.set_adapter(many._peft_names[name])
        features = many.task.encode(many.task.make_examples(TEXTS), many.tokenizer,
                                    many.metas[name].labels, 32, "predict")
        batch = many.task.collate(features, many.tokenizer.pad_token_id)
        with torch.no_grad():
            logits[name] = many.model(**batch).logits
            reference = own[name].model(**batch).logits
        torch.testing.assert_close(logits[name], reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits["first"], logits["second"])
    with pytest.raises(ConfigError, match="unknown adapter"):
        many.predict(TEXTS[:1], ["third"])
