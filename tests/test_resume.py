"""Kill-and-resume: a run interrupted at any point and restarted from its output folder ends with
the same adapter weights and metrics as the run that was never interrupted."""

from __future__ import annotations


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
    original = torch.nn.utils.clip_grad_norm_

    def clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


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
