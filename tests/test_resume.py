"""Kill-and-resume: a run interrupted at any point and restarted from its output folder ends with
the same adapter weights and metrics as the run that was never interrupted."""

from __future__ import annotations

import os

import accelerate
import pytest
import torch

from adaptune import checkpoint as ckpt
from adaptune import train
from adaptune.safe_io import load_safetensors
from conftest import run_victim, tiny_config

STEPS = 15


class Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so nothing catches it."""


def _config(tiny_encoder, cls_files, out, method="lora"):
    return tiny_config(tiny_encoder, *cls_files, out,
                       method={"name": method, "rank": 4,
                               **({"adalora": {"init_rank": 6, "delta_t": 1}}
                                  if method == "adalora" else {})},
                       train={"max_steps": STEPS, "checkpoint_every": 2, "eval_every": 5,
                              "batch_size": 8})


def _weights(result):
    folder = result.adapter_dir
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() \
        else "trainable.safetensors"
    return load_safetensors(folder / name)


def _kill_at_step(monkeypatch, step):
    calls = {"n": 0}
    original = accelerate.Accelerator.clip_grad_norm_

    def clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip)


def _kill_in(monkeypatch, module, name, nth, after=None):
    calls = {"n": 0}
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            if after:
                after(*args, **kwargs)
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("where", ["early", "mid_epoch", "evaluation", "checkpoint_write"])
def test_killed_run_resumes_exactly(where, method, tiny_encoder, cls_files, tmp_path,
                                    monkeypatch):
    expected = train.run(_config(tiny_encoder, cls_files, tmp_path / "ref", method))

    cfg = _config(tiny_encoder, cls_files, tmp_path / "run", method)
    with monkeypatch.context() as patch:
        if where == "early":
            _kill_at_step(patch, 1)
        elif where == "mid_epoch":
            _kill_at_step(patch, 9)  # epoch 2 of 6 batches, after the checkpoint at step 8
        elif where == "evaluation":
            _kill_in(patch, train, "evaluate", 2)  # the evaluation at step 10
        else:  # inside the checkpoint write at step 12, after its weights are on disk
            def half_write(out, *rest):
                (ckpt._dir(out) / ".tmp-step-12-x").mkdir(parents=True)
                (ckpt._dir(out) / ".tmp-step-12-x" / "weights.safetensors").write_bytes(b"x")
            _kill_in(patch, ckpt, "save", 6, after=half_write)
        with pytest.raises(Killed):
            train.run(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = train.run(cfg)

    if where != "early":
        assert resumed.metrics["resumed_from"] is not None
    for name, tensor in _weights(expected).items():
        assert torch.equal(tensor, _weights(resumed)[name]), name
    assert resumed.metrics["dev"] == expected.metrics["dev"]
    assert resumed.metrics["evaluations"] == expected.metrics["evaluations"]
    assert not (tmp_path / "run" / ckpt.CHECKPOINTS).exists()  # cleaned up when complete


@pytest.mark.integration
def test_sigkill_in_a_real_process_then_resume(tiny_encoder, cls_files, tmp_path):
    """A real SIGKILL (no cleanup runs at all) in the middle of training."""
    cfg = _config(tiny_encoder, cls_files, tmp_path / "run")
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    run_victim(tmp_path, f"""
        from adaptune.config import from_dict
        from adaptune import train
        train.run(from_dict(json.loads(open({str(tmp_path / 'cfg.json')!r}).read())))
    """, kill_at_clip=11)
    assert ckpt.latest(tmp_path / "run").name == "step-10"
    resumed = train.run(cfg)
    expected = train.run(_config(tiny_encoder, cls_files, tmp_path / "ref"))
    assert resumed.metrics["resumed_from"].endswith("step-10")
    for name, tensor in _weights(expected).items():
        assert torch.equal(tensor, _weights(resumed)[name]), name


def test_checkpoint_files_are_safetensors_and_json_only(tiny_encoder, cls_files, tmp_path,
                                                        monkeypatch):
    cfg = _config(tiny_encoder, cls_files, tmp_path / "run")
    _kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        train.run(cfg)
    files = sorted(p.name for p in ckpt.latest(tmp_path / "run").iterdir())
    assert files == ["COMPLETE", "extra.json", "extra.safetensors", "optimizer.json",
                     "optimizer.safetensors", "rng.safetensors", "state.json",
                     "weights.safetensors"]


# ----------------------------------------------------------------------------------------------
# A run folder is a transaction.


def test_a_finished_run_is_not_trained_again(tiny_encoder, cls_files, tmp_path, capsys):
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "run")
    first = train.run(cfg)
    weights = _weights(first)
    stamp = (first.adapter_dir / "adaptune.json").stat().st_mtime_ns
    again = train.run(cfg)
    assert "has already finished" in capsys.readouterr().out
    assert again.metrics == first.metrics
    assert (again.adapter_dir / "adaptune.json").stat().st_mtime_ns == stamp
    assert all(torch.equal(t, _weights(again)[n]) for n, t in weights.items())


def test_overwrite_starts_over_instead_of_resuming_the_old_checkpoint(tiny_encoder, cls_files,
                                                                      tmp_path, monkeypatch):
    cfg = _config(tiny_encoder, cls_files, tmp_path / "run")
    _kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        train.run(cfg)
    monkeypatch.undo()
    assert ckpt.latest(tmp_path / "run") is not None
    changed = cfg.replace(train={"lr": 1e-3}, overwrite=True)
    result = train.run(changed)
    assert result.metrics["resumed_from"] is None  # not the old run's checkpoint
    reference = train.run(changed.replace(output_dir=str(tmp_path / "fresh"), overwrite=False))
    for name, tensor in _weights(reference).items():
        assert torch.equal(tensor, _weights(result)[name]), name
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 1e-3


def test_a_moved_run_folder_resumes_its_run(tiny_encoder, cls_files, tmp_path, monkeypatch):
    """A results folder moved or cloned to another path (or named once by a relative and once
    by an absolute path) holds the same run: it resumes, and ends as the run never killed."""
    cfg = _config(tiny_encoder, cls_files, tmp_path / "run")
    _kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        train.run(cfg)
    monkeypatch.undo()
    (tmp_path / "run").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    result = train.run(cfg.replace(output_dir="moved"))
    assert result.metrics["resumed_from"] is not None
    reference = train.run(cfg.replace(output_dir=str(tmp_path / "fresh")))
    for name, tensor in _weights(reference).items():
        assert torch.equal(tensor, _weights(result)[name]), name


def test_resume_refuses_changed_training_data(tiny_encoder, cls_files, tmp_path, monkeypatch):
    from adaptune.errors import OutputDirError

    train_file, dev_file = cls_files
    cfg = _config(tiny_encoder, cls_files, tmp_path / "run")
    _kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        train.run(cfg)
    monkeypatch.undo()
    with open(train_file, "a") as f:
        f.write("a brand new sentence\t1\n")
    with pytest.raises(OutputDirError, match="training or dev data .* changed since the "
                                             "checkpoint"):
        train.run(cfg)


def test_a_failed_runs_leftovers_do_not_block_the_corrected_retry(tiny_encoder, cls_files,
                                                                 tmp_path, monkeypatch):
    from adaptune.errors import TrainingDiverged
    from adaptune.tasks import classification

    original = classification.ClassificationHead.forward

    def nan_loss(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(classification.ClassificationHead, "forward", nan_loss)
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "run", train={"lr": 1.0})
    with pytest.raises(TrainingDiverged):
        train.run(cfg)
    monkeypatch.undo()
    assert (tmp_path / "run" / "config.json").exists()
    retry = train.run(cfg.replace(train={"lr": 5e-3}))  # another config, same folder
    assert retry.metrics["optimizer_steps"] == 6


def test_a_second_writer_of_one_folder_fails_at_once(tiny_encoder, cls_files, tmp_path):
    from adaptune.errors import OutputDirError

    out = tmp_path / "run"
    with train.folder_lock(out):
        with pytest.raises(OutputDirError, match=r"being written by another process \(pid "
                                                 rf"{os.getpid()}\)"):
            train.run(tiny_config(tiny_encoder, *cls_files, out))
    assert not out.exists()  # nothing was written; the lock is gone with the holder


def test_an_adapter_swap_killed_between_its_renames_is_recovered(tiny_encoder, cls_files,
                                                                 tmp_path):
    from adaptune import api

    result = train.run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run"))
    expected = api.load(result.adapter_dir).predict(["good fun", "a bore"])
    # The state a kill leaves after "old aside" and before "new in".
    os.replace(result.adapter_dir, tmp_path / "run" / ".old-adapter-4242")
    (tmp_path / "run" / ".tmp-adapter-x").mkdir()
    assert api.load(result.adapter_dir).predict(["good fun", "a bore"]) == expected
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == \
        ["adapter", "config.json", "metrics.json"]


@pytest.mark.integration
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(signal_name, tiny_encoder,
                                                               cls_files, tmp_path):
    """What a cluster does at preemption (SIGTERM) or a user with Ctrl-C (SIGINT): the run
    saves a checkpoint at the next step, prints one line and exits with status 2, no
    traceback; the same command resumes it to the uninterrupted result."""
    import json
    import subprocess
    import sys
    import textwrap

    cfg = _config(tiny_encoder, cls_files, tmp_path / "run").replace(
        train={"checkpoint_every": 4})  # not a multiple of the signal's step
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    script = tmp_path / "preempted.py"
    script.write_text(textwrap.dedent(f"""
        import accelerate, json, os, signal, torch
        torch.set_num_threads(1)
        from adaptune.config import from_dict
        from adaptune.recipe import main
        original, calls = accelerate.Accelerator.clip_grad_norm_, [0]
        def clip(*a, **k):
            calls[0] += 1
            if calls[0] == 7:
                os.kill(os.getpid(), signal.{signal_name})
            return original(*a, **k)
        accelerate.Accelerator.clip_grad_norm_ = clip
        main(json.load(open({str(tmp_path / 'cfg.json')!r})))
    """))
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"error: {signal_name} at optimizer step 7: checkpoint saved to" in proc.stderr
    assert ckpt.latest(tmp_path / "run").name == "step-7"
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = train.run(cfg)
    expected = train.run(cfg.replace(output_dir=str(tmp_path / "ref")))
    assert resumed.metrics["resumed_from"].endswith("step-7")
    for name, tensor in _weights(expected).items():
        assert torch.equal(tensor, _weights(resumed)[name]), name
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["dev"] == \
        expected.metrics["dev"]
