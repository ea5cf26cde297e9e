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
    ("method.name=prefix", "method.name: expected one of lora, dora, adalora, ia3, beft, vera, "
                           "loha, lokr, oft, prompt_tuning, prefix_tuning, peft, bitfit, full, "
                           "head"),
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


def test_compose_layers_in_order_and_presets_state_only_what_differs(tmp_path):
    from adaptune.config import compose
    from adaptune.presets import PRESETS, config

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  lr: 3.0e-3\n")
    cfg = compose(PRESETS["ner_lora"], {"train": {"lr": 2e-3, "epochs": 3}},
                  yaml_path=yaml_file, overrides=["train.epochs=4"])
    assert cfg.train.lr == 3e-3 and cfg.train.epochs == 4  # YAML over layers, CLI over YAML
    assert cfg.data.task == "ner" and cfg.train.batch_size == 32  # the preset, then defaults
    adalora = config("ner_adalora")
    assert adalora.method.name == "adalora" and adalora.method.adalora.init_rank == 12
    assert adalora.data == config("ner_lora").data  # inherited, not restated


def test_each_method_owns_its_options():
    cfg = load_config(overrides=["method.name=adalora", "method.adalora.tinit=0.2"])
    assert cfg.method.adalora.tinit == 0.2
    with pytest.raises(ConfigError, match=r"method\.adalora\.tinit is an option of adalora, "
                                          r"but method\.name is 'lora'"):
        load_config(overrides=["method.adalora.tinit=0.2"])
    with pytest.raises(ConfigError, match=r"unknown config key method\.tinit \(method\.tinit is "
                                          r"now method\.adalora\.tinit\)"):
        load_config(overrides=["method.name=adalora", "method.tinit=0.2"])
    with pytest.raises(ConfigError, match="method.adalora.tinit/tfinal"):
        load_config(overrides=["method.name=adalora", "method.adalora.tinit=0.9"])


def test_stored_configs_of_older_versions_are_upgraded():
    from adaptune.config import upgrade_stored

    old = to_dict(RunConfig())
    method = old["method"]
    method.update(method.pop("adalora"))  # the flat layout before method sections
    method["name"], method["tinit"] = "adalora", 0.3
    upgraded = from_dict(upgrade_stored(old))
    assert upgraded.method.adalora.tinit == 0.3 and upgraded.method.name == "adalora"


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1.0e-3\nmethod:\n  rank: 4\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 5: key 'train' is given twice in "
                                          r"one section \(first on line 1\)"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every: expected a positive integer"),
    ("train.seed=-1", r"train.seed: expected an integer in \[0, 2\*\*32\)"),
    ("train.epochs=inf", "train.epochs: expected a finite number"),
])
def test_values_that_would_crash_mid_run_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_help_lists_every_field_and_print_config_round_trips(tmp_path, capsys):
    from adaptune import cli
    from adaptune.config import describe_fields

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: adaptune train")
    paths = [path for path, *_ in describe_fields()]
    assert "method.adalora.tinit" in paths and "train.early_stopping_patience" in paths
    assert all(f"  {path} " in text for path in paths)
    assert cli.main(["train", "--print-config", "method.rank=16", "train.lr=2e-3"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed)
    assert load_config(tmp_path / "c.yaml") == load_config(
        overrides=["method.rank=16", "train.lr=2e-3"])
    assert cli.main(["train", "--print-config", "method.rnk=16"]) == 2
    assert "unknown config key method.rnk" in capsys.readouterr().err
