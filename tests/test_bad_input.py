"""Bad input gets a clear error that names the file, line or field, before any training, and
leaves nothing behind in the output folder."""

from __future__ import annotations

import pytest

from adaptune.errors import ConfigError, DataError, ModelError, OutputDirError
from adaptune.train import run
from conftest import tiny_config


def _fails(cfg, error, match):
    with pytest.raises(error, match=match):
        run(cfg)
    assert not cfg.resolved_output_dir.exists(), "a failed run must leave no output folder"


def test_unknown_model_name_lists_the_zoo(cls_files, tmp_path):
    cfg = tiny_config("no-such-model", *cls_files, tmp_path / "out")
    _fails(cfg, ModelError, "zoo models: minilm-l3, minilm-l6, mpnet-base")


def test_missing_data_file(tiny_encoder, cls_files, tmp_path):
    cfg = tiny_config(tiny_encoder, str(tmp_path / "nope.tsv"), cls_files[1], tmp_path / "out")
    _fails(cfg, DataError, r"nope\.tsv: file not found")


def test_malformed_line_names_file_and_line(tiny_encoder, cls_files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\ngood fun\t1\nno label column here\n")
    cfg = tiny_config(tiny_encoder, str(bad), cls_files[1], tmp_path / "out")
    _fails(cfg, DataError, r"bad\.tsv, line 3: expected 2 tab-separated columns")


def test_wrong_header_names_the_columns(tiny_encoder, cls_files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood fun\t1\n")
    cfg = tiny_config(tiny_encoder, str(bad), cls_files[1], tmp_path / "out")
    _fails(cfg, DataError, r"bad\.tsv, line 1: header has columns .* expected columns named "
                           r"\['text'\]")


def test_dev_labels_unseen_in_train(tiny_encoder, cls_files, tmp_path):
    dev = tmp_path / "dev3.tsv"
    dev.write_text("text\tlabel\ngood fun\t1\nmeh\t2\n")
    cfg = tiny_config(tiny_encoder, cls_files[0], str(dev), tmp_path / "out")
    _fails(cfg, DataError, r"dev labels \['2'\] never occur in the training data \(first at "
                           r".*dev3\.tsv:3\)")


def test_empty_split(tiny_encoder, cls_files, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("text\tlabel\n")
    cfg = tiny_config(tiny_encoder, cls_files[0], str(empty), tmp_path / "out")
    _fails(cfg, DataError, r"empty\.tsv: the dev split has no examples")
    blank = tmp_path / "blank.tsv"
    blank.write_text("\n\n")
    cfg = tiny_config(tiny_encoder, str(blank), cls_files[1], tmp_path / "out")
    _fails(cfg, DataError, r"blank\.tsv: file is empty")


def test_binary_and_misencoded_files(tiny_encoder, cls_files, tmp_path):
    binary = tmp_path / "bin.tsv"
    binary.write_bytes(b"text\tlabel\n\x00\x01\x02\t1\n")
    _fails(tiny_config(tiny_encoder, str(binary), cls_files[1], tmp_path / "out"), DataError,
           "binary file")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("text\tlabel\nok\t1\ncaf\xe9\t0\n".encode("latin-1"))
    _fails(tiny_config(tiny_encoder, str(latin), cls_files[1], tmp_path / "out"), DataError,
           r"latin\.tsv, line 3: not valid utf-8")


def test_rank_larger_than_the_layer(tiny_encoder, cls_files, tmp_path):
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "out", method={"rank": 64})
    _fails(cfg, ConfigError, r"method\.rank: 64 is larger than the layer 'query' allows "
                             r"\(32 x 32: at most 32\)")


def test_target_that_matches_nothing(tiny_encoder, cls_files, tmp_path):
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "out",
                      method={"targets": ["q_proj"]})
    _fails(cfg, ConfigError, r"'q_proj' matches no linear layer of the model; its linear layers "
                             r"end in: dense, key, query, value")


def test_output_folder_of_another_run(tiny_encoder, cls_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = tiny_config(tiny_encoder, *cls_files, out)
    with pytest.raises(OutputDirError, match="is not empty and holds another run"):
        run(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # The same run may reuse its own folder; another config may not.
    first = run(cfg.replace(overwrite=True))
    assert first.metrics["optimizer_steps"] == 6
    with pytest.raises(OutputDirError):
        run(cfg.replace(train={"lr": 1e-4}))
