"""Two processes on the CPU (gloo) through a real `accelerate launch`: data split across
processes, one evaluation, outputs from one process, the same metric as one process with the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _launch(processes: int, batch: int, model: str, train: str, dev: str, out: Path) -> dict:
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        cmd.append("--multi_gpu")  # accelerate's multi-process launcher; gloo without GPUs
    cmd += [str(ROOT / "recipes" / "cls_lora.py"), f"model.name={model}", "model.max_length=32",
            "data.dataset=custom", f"data.train_path={train}", f"data.dev_path={dev}",
            "train.max_steps=24", f"train.batch_size={batch}", "train.lr=2e-2",
            "train.eval_every=12", "method.name=full", "train.precision=fp32",
            "train.num_threads=1", "method.dropout=0", f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 12:") == 1 and proc.stdout.count("step 24:") == 1
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_match_one_with_the_same_global_batch(tiny_encoder, cls_files, tmp_path):
    one = _launch(1, 16, tiny_encoder, *cls_files, tmp_path / "one")
    two = _launch(2, 8, tiny_encoder, *cls_files, tmp_path / "two")
    print(f"1 process: {one['dev']} loss {one['final_train_loss']:.4f}; "
          f"2 processes: {two['dev']} loss {two['final_train_loss']:.4f}")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    # One schedule step per optimizer step with any number of processes: halfway through the
    # linear decay the lr is still about half its peak in both (accelerate's scheduler wrapper
    # stepped it once per process, and with 2 it reached 0 halfway).
    for m in (one, two):
        assert [e["step"] for e in m["evaluations"]] == [12, 24]
        assert m["evaluations"][0]["lr"] == pytest.approx(one["evaluations"][0]["lr"])
        assert 0.3 * 2e-2 < m["evaluations"][0]["lr"] < 0.7 * 2e-2
    assert one["train_padded_tokens"] == two["train_padded_tokens"] or \
        abs(one["train_real_tokens"] - two["train_real_tokens"]) < 0.2 * one["train_real_tokens"]
    # Same global batch and steps: both learn the task, to the same dev accuracy within 2 of
    # the 12 dev examples (the processes split batches and dropout masks differently). The
    # training loss is not compared: with 2 processes it is rank 0's half of each batch.
    assert one["dev"]["accuracy"] >= 0.75 and two["dev"]["accuracy"] >= 0.75
    assert abs(one["dev"]["accuracy"] - two["dev"]["accuracy"]) <= 2 / 12 + 1e-9
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["adapter", "config.json", "metrics.json"]


def test_two_runs_in_one_launched_process(tiny_encoder, cls_files, tmp_path):
    """A script that calls run() twice under `accelerate launch` with 2 processes (as domain
    adaptation does): the process group must survive the first run (accelerate's
    end_training() would destroy it) and be released once, at exit."""
    train, dev = cls_files
    script = tmp_path / "two_runs.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import tiny_config
from adaptune.recipe import release_process_group
from adaptune.train import run
try:
    for name in ("first", "second"):
        run(tiny_config({tiny_encoder!r}, {train!r}, {dev!r}, {str(tmp_path)!r} + "/" + name,
                        train={{"max_steps": 2}}))
finally:
    release_process_group()
""")
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
           "--multi_gpu", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("first", "second"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["num_processes"] == 2 and metrics["optimizer_steps"] == 2


def test_two_process_preemption_and_exact_resume(tiny_encoder, cls_files, tmp_path):
    """SIGTERM to process 0 only (as a scheduler preempting one node would): both processes
    stop at the same step with one checkpoint, and the relaunched run resumes to exactly the
    weights of a 2-process run never interrupted (each process's own dropout RNG restored)."""
    from safetensors.torch import load_file

    train, dev = cls_files
    script = tmp_path / "preempted.py"
    script.write_text(f"""
import accelerate, os, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import tiny_config
from adaptune.errors import Interrupted
from adaptune.recipe import release_process_group
from adaptune.train import run
out, kill_at = sys.argv[1], int(sys.argv[2])
if kill_at and os.environ.get("RANK") == "0":
    original, calls = accelerate.Accelerator.clip_grad_norm_, [0]
    def clip(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)
    accelerate.Accelerator.clip_grad_norm_ = clip
try:
    run(tiny_config({tiny_encoder!r}, {train!r}, {dev!r}, out, method={{"name": "full"}},
                    train={{"max_steps": 12, "checkpoint_every": 4, "lr": 2e-2,
                           "batch_size": 8}}))
except Interrupted as exc:
    # One file per rank: two ranks printing to one pipe at once interleave their lines.
    with open(out + ".interrupted-rank" + os.environ["RANK"], "w") as f:
        f.write(str(exc))
    sys.exit(3)
finally:
    release_process_group()
""")
    env = {**os.environ, "ADAPTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def launch(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
               "--multi_gpu", str(script), str(out), str(kill_at)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    stopped = launch(tmp_path / "run", 7)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    reasons = [(tmp_path / f"run.interrupted-rank{rank}").read_text() for rank in (0, 1)]
    assert all(r.startswith(("SIGTERM", "a signal to a peer")) for r in reasons), reasons
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-7"]
    resumed = launch(tmp_path / "run", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = launch(tmp_path / "ref", 0)
    assert reference.returncode == 0, reference.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("step-7") and metrics["num_processes"] == 2
    ours = load_file(str(tmp_path / "run" / "adapter" / "trainable.safetensors"))
    theirs = load_file(str(tmp_path / "ref" / "adapter" / "trainable.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch_equal(ours[k], theirs[k]) for k in ours), [
        k for k in ours if not torch_equal(ours[k], theirs[k])][:5]


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
