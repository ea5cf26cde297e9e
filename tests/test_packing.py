"""Packed training (adaptune.packing): each adapter of a pack equals its run alone, the pack
refuses what it cannot do, and a sweep with --pack records every cell once across a kill."""

from __future__ import annotations

import json
import random

import pytest
import torch

from adaptune.errors import ConfigError
from adaptune.packing import pack_key, run_packed, unpackable_reason
from adaptune.safe_io import load_safetensors
from adaptune.train import run
from conftest import tiny_config, tiny_grid


@pytest.fixture(scope="module")
def tiny_encoder_no_dropout(tmp_path_factory) -> str:
    """The tiny BERT with its own dropout off: a pack then draws nothing a run alone would not
    (the heads' dropout stays on and comes from each member's own stream)."""
    from transformers import BertConfig, BertModel

    from conftest import _write_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    _write_tokenizer(folder, decoder=False)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def _ner_files(tmp_path) -> tuple[str, str]:
    """A small NER set of sentences of very different lengths (so that a pack pads rows)."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "rome", "paris", "anna", "marco", "runs", "sees"]
    tags = {"rome": "B-LOC", "paris": "B-LOC", "anna": "B-PER", "marco": "B-PER"}

    def sentences(n: int) -> str:
        out = []
        for _ in range(n):
            sent = [rng.choice(words) for _ in range(rng.randint(2, 14))]
            out.append("\n".join(f"{w}\t{tags.get(w, 'O')}" for w in sent))
        return "\n\n".join(out) + "\n"

    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text(sentences(40))
    dev.write_text(sentences(12))
    return str(train), str(dev)


# Three members: three ranks, seeds, lrs, alphas and schedules; the third with a selection split
# carved from train and early stopping.
MEMBERS = [
    {"method": {"rank": 2, "alpha": 4}, "train": {"seed": 0, "lr": 5e-3}},
    {"method": {"rank": 4, "alpha": 4, "scaling": "rslora"},
     "train": {"seed": 1, "lr": 1e-2, "warmup_ratio": 0.2}},
    {"method": {"rank": 8, "alpha": 16, "targets": ["query", "key", "value", "dense"]},
     "data": {"selection_examples": 8}, "train": {"seed": 2, "lr": 2e-3,
                                                  "early_stopping_patience": 2}},
]


def _configs(model, train, dev, root, task):
    common = {"method": {"name": "lora"}, "train": {"max_steps": 9, "eval_every": 3}}
    if task == "ner":
        common["data"] = {"task": "ner", "dataset": "custom"}
    out = []
    for i, member in enumerate(MEMBERS):
        sections = {key: {**common.get(key, {}), **member.get(key, {})}
                    for key in ("method", "train", "data")}
        out.append(tiny_config(model, train, dev, root / f"m{i}", **sections))
    return out


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_each_packed_adapter_equals_its_run_alone(tiny_encoder_no_dropout, cls_files, tmp_path,
                                                  task):
    """K = 3 adapters of three ranks trained in one pack: each one's weights, training losses
    and dev scores equal those of the same run alone, within fp32 rounding (1e-5)."""
    train, dev = cls_files if task == "classification" else _ner_files(tmp_path)
    alone = [run(cfg) for cfg in _configs(tiny_encoder_no_dropout, train, dev,
                                          tmp_path / "alone", task)]
    packed = run_packed(_configs(tiny_encoder_no_dropout, train, dev, tmp_path / "pack", task),
                        log=lambda _line: None)
    for a, p in zip(alone, packed):
        ma, mp = a.metrics, p.metrics
        assert mp["pack"]["size"] == 3
        for key in ("trainable_params", "total_params", "backbone_params",
                    "backbone_non_embedding_params", "optimizer_steps"):
            assert mp[key] == ma[key], key
        assert mp["best_step"] == ma["best_step"]
        assert [e["train_loss"] for e in mp["evaluations"]] == pytest.approx(
            [e["train_loss"] for e in ma["evaluations"]], rel=1e-5, abs=1e-6)
        for key, value in ma["dev"].items():
            assert mp["dev"][key] == pytest.approx(value, abs=1e-6), key
        wa = load_safetensors(a.adapter_dir / "adapter_model.safetensors")
        wp = load_safetensors(p.adapter_dir / "adapter_model.safetensors")
        assert wa.keys() == wp.keys() and len(wa) > 2
        for key in wa:
            torch.testing.assert_close(wp[key], wa[key], rtol=1e-4, atol=1e-5)
        config_a = json.loads((a.adapter_dir / "adapter_config.json").read_text())
        config_p = json.loads((p.adapter_dir / "adapter_config.json").read_text())
        assert config_p == config_a
    # The members really differed (not one run three times).
    assert len({r.metrics["trainable_params"] for r in packed}) == 3


def test_members_of_one_seed_share_their_data_and_still_equal_their_runs(
        tiny_encoder_no_dropout, cls_files, tmp_path):
    """Two ranks at one seed read and tokenize the data once; each still equals its run."""
    train, dev = cls_files

    def configs(root):
        return [tiny_config(tiny_encoder_no_dropout, train, dev, root / f"r{r}",
                            method={"rank": r}, train={"seed": 3, "max_steps": 6})
                for r in (2, 4)]

    alone = [run(cfg) for cfg in configs(tmp_path / "alone")]
    packed = run_packed(configs(tmp_path / "pack"), log=lambda _line: None)
    for a, p in zip(alone, packed):
        assert p.metrics["trainable_params"] == a.metrics["trainable_params"]
        assert p.metrics["final_train_loss"] == pytest.approx(a.metrics["final_train_loss"],
                                                              rel=1e-5)
        wa = load_safetensors(a.adapter_dir / "adapter_model.safetensors")
        wp = load_safetensors(p.adapter_dir / "adapter_model.safetensors")
        for key in wa:
            torch.testing.assert_close(wp[key], wa[key], rtol=1e-4, atol=1e-5)


def test_a_packed_adapter_loads_and_predicts_as_its_metrics_say(tiny_encoder, cls_files,
                                                                tmp_path):
    """With the backbone's dropout on (the usual case), a packed adapter is an ordinary
    adaptune/peft adapter folder: it loads, and its predictions give its reported accuracy."""
    import adaptune
    from conftest import dev_accuracy_of_predictions

    train, dev = cls_files
    results = run_packed(_configs(tiny_encoder, train, dev, tmp_path, "classification")[:2],
                         log=lambda _line: None)
    for result in results:
        predictor = adaptune.load(result.adapter_dir)
        assert dev_accuracy_of_predictions(predictor, dev) == pytest.approx(
            result.metrics["dev"]["accuracy"])
    # A finished pack is not trained again.
    again = run_packed(_configs(tiny_encoder, train, dev, tmp_path, "classification")[:2],
                       log=lambda _line: None)
    assert [r.metrics for r in again] == [r.metrics for r in results]


def test_what_cannot_be_packed_is_refused_with_the_setting(tiny_encoder, cls_files, tmp_path):
    train, dev = cls_files
    dora = tiny_config(tiny_encoder, train, dev, tmp_path / "d", method={"name": "dora"})
    assert "method.name=dora" in unpackable_reason(dora) and pack_key(dora) is None
    eva = tiny_config(tiny_encoder, train, dev, tmp_path / "e", method={"lora": {"init": "eva"}})
    assert "method.lora.init=eva" in unpackable_reason(eva)
    halving = tiny_config(tiny_encoder, train, dev, tmp_path / "h",
                          train={"pause_at_fraction": 0.5})
    assert "train.pause_at_fraction" in unpackable_reason(halving)
    plain = tiny_config(tiny_encoder, train, dev, tmp_path / "p")
    assert unpackable_reason(plain) == "" and pack_key(plain) is not None
    with pytest.raises(ConfigError, match="cannot train in a pack: method.name=dora"):
        run_packed([plain, dora])
    longer = tiny_config(tiny_encoder, train, dev, tmp_path / "l", model={"max_length": 16})
    with pytest.raises(ConfigError, match="model.max_length differs"):
        run_packed([plain, longer])
    assert not (tmp_path / "p").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# Sweeps with --pack.


def _grid(model, cls_files, **changes) -> dict:
    return tiny_grid(model, cls_files, **{"name": "tiny-packs", "ranks": [2, 4, 8],
                                          "seeds": [0, 1], **changes})


def test_a_packed_sweep_records_every_cell_once(tiny_encoder, cls_files, tmp_path, capsys):
    from adaptune import sweep

    grid = sweep.grid_from_dict(_grid(tiny_encoder, cls_files))
    out = tmp_path / "results"
    summary = sweep.run_grid(grid, out, pack=3)
    cells, _ = sweep.expand(grid)
    assert summary.done == summary.total == len(cells) == 8 and not summary.failed
    records = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(records) == {c.id for c in cells}
    lora = [r for r in records.values() if r["axes"]["method"] == "lora"]
    # Seed-major order: the ranks of one seed share a pack; head cannot be packed.
    assert [r["pack"]["size"] for r in lora] == [3] * 6
    assert all("pack" not in r for r in records.values() if r["axes"]["method"] == "head")
    assert all(r["status"] == "ok" and r["optimizer_steps"] == 4 for r in records.values())
    assert "in a pack of 3" in capsys.readouterr().out
    assert not list((out / "locks").iterdir()) and not any((out / "work").iterdir())


def test_a_failing_pack_falls_back_to_its_cells_alone(tiny_encoder, cls_files, tmp_path):
    """A rank larger than the tiny model's layers (32) fails the pack; each of its cells then
    runs alone and is recorded as it would be without --pack (that one as skipped)."""
    from adaptune import sweep

    grid = sweep.grid_from_dict(_grid(tiny_encoder, cls_files, methods=["lora"],
                                      ranks=[2, 64], seeds=[0]))
    out = tmp_path / "results"
    assert sweep.run_grid(grid, out, pack=2).done == 2
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert sorted(r["status"] for r in records) == ["ok", "skipped"]
    assert all("pack" not in r for r in records)


@pytest.mark.integration
def test_a_killed_packed_sweep_restarts_to_every_cell_exactly_once(tiny_encoder, cls_files,
                                                                   tmp_path):
    """SIGKILL inside the second pack (after the first pack's three records); the restart,
    packed again, ends with every cell recorded exactly once and nothing left in work/."""
    from adaptune import sweep
    from conftest import run_victim

    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(_grid(tiny_encoder, cls_files, methods=["lora"])))
    out = tmp_path / "results"
    # Every pack step clips each of its three members: the first pack takes 3 x 4 calls.
    run_victim(tmp_path, f"""
        from adaptune import sweep
        grid = sweep.grid_from_dict(json.loads(open({str(grid_file)!r}).read()))
        sweep.run_grid(grid, {str(out)!r}, pack=3)
    """, kill_at_clip=3 * 4 + 3 * 2, clip_owner="torch.nn.utils")
    assert len(list((out / "cells").glob("*.json"))) == 3
    assert any((out / "work").iterdir())  # the second pack's half-done runs
    grid = sweep.grid_from_dict(json.loads(grid_file.read_text()))
    summary = sweep.run_grid(grid, out, pack=3)
    ids = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert ids == sorted(c.id for c in sweep.expand(grid)[0]) and summary.done == 6
    assert all(json.loads(p.read_text())["pack"]["size"] == 3
               for p in (out / "cells").glob("*.json"))
    assert not any((out / "work").iterdir()) and not list((out / "locks").iterdir())
