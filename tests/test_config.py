"""Config: defaults once, strict overrides, errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from adaptune.config import RunConfig, from_dict, load_config, parse_overrides, to_dict
from adaptune.errors import ConfigError


def test_defaults_are_frozen_and_round_trip():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_convert_by_field_type():
    cfg = load_config(overrides=["train.lr=1e-3", "method.rank=16", "train.group_by_length=false",
                                 "method.targets=query,key,value"])
    assert cfg.train.lr == 1e-3 and cfg.method.rank == 16
    assert cfg.train.group_by_length is False
    assert cfg.method.targets == ("query", "key", "value")
    assert cfg.method.lora_alpha == 32.0  # derived: 2 * rank


def test_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.002\n  epochs: 3\nmethod:\n  name: bitfit\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.method.name) == (0.002, 2.0, "bitfit")


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr"),
    ("nosection.x=1", "unknown config key nosection"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer"),
    ("method.rank=0", "method.rank: expected a positive integer"),
    ("method.name=prefix", "method.name: expected one of lora, adalora, bitfit, full, head"),
    ("train.precision=fp8", "train.precision: expected one of auto, fp32, bf16"),
    ("train.group_by_length=maybe", "train.group_by_length: expected true or false"),
    ("data.train_fraction=1.5", "data.train_fraction"),
    ("lr", "expected section.field=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides=[override])


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrate: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key train\.lrate"):
        load_config(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=2"]) == {"a": {"b": "1", "c": "x"}, "d": "2"}
