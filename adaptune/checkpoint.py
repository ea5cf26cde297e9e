"""Resumable training checkpoints.

A checkpoint is a folder `checkpoints/step-N/` written atomically (a temporary folder renamed
into place when complete, with a `COMPLETE` marker written last), holding:

  weights.safetensors    the trainable parameters
  best-weights.safetensors  those of the kept checkpoint, in runs with a selection split
  optimizer.safetensors  AdamW moments (tensors) + optimizer.json (param groups, structure)
  extra.safetensors      the method's own state (AdaLoRA's importance scores) + extra.json
  rng.safetensors        torch CPU/CUDA generator states
  state.json             step, epoch, position in the epoch, running sums, best metric, scheduler

Everything is safetensors or JSON: nothing is unpickled. Restoring puts the run back exactly
where it was: same parameters, optimizer moments, schedule, dropout RNG and data position.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptune.safe_io import atomic_dir, load_safetensors, write_json

if TYPE_CHECKING:
    from adaptune.methods import Method

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
BEST_WEIGHTS = "best-weights.safetensors"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    loss_sum: float = 0.0
    loss_count: int = 0
    window_loss_sum: float = 0.0  # since the last evaluation
    window_loss_count: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    best: float | None = None
    best_example_stats: list[list[float]] | None = None  # of the best evaluation (main process)
    best_dev: dict[str, float] | None = None  # dev scores of the kept checkpoint (selection runs)
    since_best: int = 0  # evaluations since the last improvement (early stopping)
    stopped_early: bool = False
    evals: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    overhead: float = 0.0  # seconds spent evaluating and checkpointing, not training
    fingerprint: str = ""  # of the config and data this state was trained on (train.fingerprint)

    def add_loss(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        self.window_loss_sum += loss
        self.window_loss_count += 1

    def take_window_loss(self) -> float:
        """Mean loss since the last call (the last evaluation), and start a new window."""
        mean = self.window_loss_sum / max(1, self.window_loss_count)
        self.window_loss_sum, self.window_loss_count = 0.0, 0
        return mean


def _dir(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones (no COMPLETE marker) are ignored."""
    root = _dir(out)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / COMPLETE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save(out: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
         state: TrainState, method: "Method",
         best_weights: dict[str, torch.Tensor] | None = None) -> Path | None:
    accelerator.wait_for_everyone()
    final = _dir(out) / f"step-{state.step}"
    # Every process's own random state (dropout masks differ per process): gathered here, each
    # put back on its own process when resuming, so a resumed multi-process run is exact too.
    rng_states = _gather_rng(accelerator)
    if accelerator.is_main_process:
        try:
            _write(final, accelerator, model, optimizer, scheduler, state, method, rng_states,
                   best_weights)
        except OSError as exc:  # disk full, quota, permissions: the previous one is intact
            from adaptune.errors import OutputDirError

            raise OutputDirError(f"could not write the checkpoint {final}: "
                                 f"{exc.strerror or exc}; the previous checkpoint "
                                 f"({latest(out) or 'none'}) is intact and a rerun resumes "
                                 "from it") from None
        for old in _dir(out).glob("step-*"):  # keep only the newest
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write(final: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any,
           scheduler: Any, state: TrainState, method: "Method",
           rng_states: list[dict[str, Any]],
           best_weights: dict[str, torch.Tensor] | None) -> None:
    from safetensors.torch import save_file

    unwrapped = accelerator.unwrap_model(model)
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in unwrapped.named_parameters()
                   if p.requires_grad}, str(tmp / "weights.safetensors"))
        tensors, structure = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", structure)
        if best_weights is not None:  # the kept checkpoint's weights (selection runs)
            save_file({n: t.contiguous() for n, t in best_weights.items()},
                      str(tmp / BEST_WEIGHTS))
        extra_tensors, extra_meta = method.checkpoint_state(unwrapped)
        save_file(extra_tensors, str(tmp / "extra.safetensors"))
        write_json(tmp / "extra.json", extra_meta)
        # Process 0's states under the plain names (what single-process checkpoints hold),
        # every process's under rank<i>/.
        rng = {k: v.clone() for k, v in rng_states[0]["torch"].items()}
        for rank, states in enumerate(rng_states):
            rng.update({f"rank{rank}/{k}": v for k, v in states["torch"].items()})
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {
            **asdict(state), "scheduler": scheduler.state_dict(),
            "python_random": rng_states[0]["python"],
            "python_random_by_rank": [states["python"] for states in rng_states]})
        (tmp / COMPLETE).write_text("ok\n")


def restore_latest(out: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                   scheduler: Any, state: TrainState, method: "Method") -> str | None:
    path = latest(out)
    if path is None:
        return None
    unwrapped = accelerator.unwrap_model(model)
    weights = load_safetensors(path / "weights.safetensors")
    own = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
    structure = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(
        load_safetensors(path / "optimizer.safetensors"), structure))
    method.restore_checkpoint_state(unwrapped, load_safetensors(path / "extra.safetensors"),
                                    json.loads((path / "extra.json").read_text()))
    saved = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(saved.pop("scheduler"))
    rank = accelerator.process_index
    by_rank = saved.pop("python_random_by_rank", None)
    python_state = saved.pop("python_random")
    # This process's own states where the checkpoint has them (an older checkpoint, or one of
    # a run with fewer processes, has process 0's only).
    random.setstate(_to_tuple(by_rank[rank] if by_rank and rank < len(by_rank)
                              else python_state))
    for key, value in saved.items():
        setattr(state, key, value)
    rng = load_safetensors(path / "rng.safetensors")
    prefix = f"rank{rank}/" if f"rank{rank}/cpu" in rng else ""
    torch.set_rng_state(rng[prefix + "cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng)
                                      if k.startswith(prefix + "cuda")])
    accelerator.print(f"resumed from {path} (step {state.step})")
    return str(path)


def restore_best_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The kept checkpoint's weights saved with checkpoint `path`, if it has them."""
    file = Path(path) / BEST_WEIGHTS
    return load_safetensors(file) if file.exists() else None


def remove_all(out: Path) -> None:
    shutil.rmtree(_dir(out), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Helpers: optimizer state <-> flat tensors, RNG.


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = tensor
    for idx, values in structure.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": structure["param_groups"]}


def _gather_rng(accelerator: Any) -> list[dict[str, Any]]:
    """[per process: {"torch": {name: state tensor}, "python": random's state}]."""
    torch_states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            torch_states[f"cuda{i}"] = s
    mine = {"torch": torch_states, "python": _py_random_state()}
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _to_tuple(saved: list) -> tuple:
    return (saved[0], tuple(saved[1]), saved[2])
