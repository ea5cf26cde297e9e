"""`train.compile=auto`: compile the repeated blocks only when the run is long enough to repay
the compilation.

torch.compile costs a fixed compile time and then saves a little on every step; on this
project's CPU it paid after roughly 2,000 steps with a cold compile cache. So the decision is a
prediction: saving = steps x (eager step - compiled step), cost = the compile (the first compiled
pass, less a compiled step); compile when the saving exceeds the cost. The three times are
measured once per machine and model shape -- on the run's own model and a median-length
training batch, forward and backward, random state restored -- and cached in
`$ADAPTUNE_CACHE/compile.json`. A run with nothing cached that is shorter than
UNMEASURED_MIN_STEPS stays eager and measures nothing (a measurement would cost a compile that
such a run cannot repay); a longer one measures -- the compile it pays is then the one it
trains with, when the prediction says so -- and the next runs of that shape read the cache.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
from torch import nn

from adaptune.precision import (cache_key, cached, kept_random_state, measure_and_store,
                                timed_pass)

CACHE_FILE = "compile.json"
UNMEASURED_MIN_STEPS = 2000
REPEATS = 3


def uncompile(model: nn.Module) -> None:
    """Undo `compile_blocks` (nn.Module.compile keeps the compiled call beside the module)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def measure(model: nn.Module, batch: dict[str, torch.Tensor], device: str,
            bf16: bool = False) -> dict[str, float]:
    """Eager step, compile and compiled step times of `model` on `batch`; leaves the model's
    blocks compiled (the caller undoes it if the prediction says no)."""
    from adaptune.modeling import compile_blocks

    with kept_random_state(device):
        timed_pass(model, batch, device, bf16)  # warm-up
        eager = statistics.median(timed_pass(model, batch, device, bf16)
                                  for _ in range(REPEATS))
        blocks = compile_blocks(model)
        if not blocks:
            return {"eager_s": eager, "compiled_s": eager, "compile_s": 0.0, "blocks": 0}
        first = timed_pass(model, batch, device, bf16)
        compiled = statistics.median(timed_pass(model, batch, device, bf16)
                                     for _ in range(REPEATS))
    return {"eager_s": eager, "compiled_s": compiled, "compile_s": max(0.0, first - compiled),
            "blocks": blocks}


def predicted_saving(figures: dict[str, float], steps: int) -> float:
    """Seconds compiling saves over `steps` steps, net of the compile (negative: it costs)."""
    return steps * (figures["eager_s"] - figures["compiled_s"]) - figures["compile_s"]


def decide(mode: str, *, steps: int, device: str, key_parts: dict[str, Any],
           measure_fn: Callable[[], dict[str, float]]) -> tuple[bool, dict[str, Any]]:
    """(compile?, record for metrics.json). `measure_fn` runs `measure` on the run's model."""
    if mode in ("on", "off"):
        return mode == "on", {"requested": mode, "compiled": mode == "on", "why": "asked for"}
    key = cache_key(device, key_parts)
    figures, source = cached(CACHE_FILE, key)[1], "cached measurement"
    if figures is None:
        if steps < UNMEASURED_MIN_STEPS:
            return False, {"requested": "auto", "compiled": False,
                           "why": f"{steps} steps and no measurement for this model here: "
                                  f"runs under {UNMEASURED_MIN_STEPS} steps stay eager"}
        figures, source = measure_and_store(CACHE_FILE, key, measure_fn), "measured now"
    saving = predicted_saving(figures, steps)
    return saving > 0, {"requested": "auto", "compiled": saving > 0, "figures": figures,
                        "source": source, "predicted_saving_s": saving,
                        "why": f"predicted saving over {steps} steps {saving:+.0f} s net of the "
                               f"compile ({source})"}


def apply(mode: str, model: nn.Module, *, steps: int, device: str, key_parts: dict[str, Any],
          measure_fn: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """Compile `model`'s blocks (in place) when `decide` says so; returns the record."""
    from adaptune.modeling import compile_blocks

    compiled, record = decide(mode, steps=steps, device=device, key_parts=key_parts,
                              measure_fn=measure_fn)
    if compiled and not any(getattr(m, "_compiled_call_impl", None) is not None
                            for m in model.modules()):
        record["blocks"] = compile_blocks(model)
    elif not compiled:
        uncompile(model)  # a measurement compiled them; the prediction says no
    return record
