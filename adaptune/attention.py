"""`model.attention=auto`: the attention kernel that trains this model faster here, sdpa or
eager, measured rather than assumed.

transformers takes `scaled_dot_product_attention` (sdpa) wherever an architecture has it. That
is the right call on GPUs and for long sequences, but not everywhere: on this project's 2-core
AVX2 CPU the plain matmul-softmax-matmul ("eager") trained the NER job 1.09x faster and the
SST-2 job 1.11x (identical dev metrics: with the backbone's dropout off the two compute the same
function), the fused CPU kernel being slower than two large matrix products at sequence lengths
of 20-60. So the choice is measured like the precision (adaptune.precision): forward and backward
passes of the run's own model, its method applied, in the chosen precision, each kernel in turn
after a warm-up, random state restored; eager is taken when it is at least MARGIN faster. They
are timed on two training batches, one with padding and one without
(`adaptune.precision.probe_batches`): for a batch without padding transformers gives sdpa no
mask, and its fast path then tied eager on smollm2-135m in bf16 (475 against 472 ms) while eager
was 1.25-1.37x faster on a padded batch; one median batch spoke for one kind only, and 45% of
that job's batches are padded. Where the precision is measured too, both are measured together
(adaptune.precision: each precision with each kernel), and the kernel is then picked from those
figures in the chosen precision. The answer is cached per device, torch version, threads, model,
method, task, batch size and precision in `$ADAPTUNE_CACHE/attention.json`.

Eager keeps the attention probabilities of every layer for the backward pass: memory that grows
with the square of the sequence length. Before measuring, that extra memory is bounded for the
run's longest possible batch; eager is never tried when the bound exceeds MEMORY_SHARE of the
memory available, however fast it would be.

Not measured (transformers' choice kept): an explicit `model.attention`; an architecture whose
kernel transformers did not resolve to sdpa, or that cannot switch kernels after loading; runs of
fewer than UNMEASURED_MIN_STEPS steps with nothing cached (a measurement costs up to 16 steps,
about what such a run gains at a typical speed-up); several processes with nothing cached (they
would time each other).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from adaptune.precision import (Batches, batch_facts, cache_key, cached, faster,
                                measure_and_store, time_passes)

CACHE_FILE = "attention.json"
COMPARED = ("sdpa", "eager")
MARGIN = 1.03  # eager must be at least 3% faster to be chosen (the two are otherwise equal)
# A measurement is up to 2 kernels x 2 batches x (1 + precision.REPEATS) = 16 forward+backward
# passes (timed with the precision's where that is measured too: 16 more than the precision's
# own), about 16 training steps. Eager's gains measured on CPUs so far: 1.04x to 1.92x over six jobs
# and machines, median about 1.12x, which repays 16 steps after 16 / (1 - 1/1.12), about 150
# steps; shorter runs with nothing cached keep transformers' choice. (At the smallest gain,
# 1.04x, it would take about 420.)
UNMEASURED_MIN_STEPS = 150
MEMORY_SHARE = 0.2  # eager's extra memory may take at most this share of the available memory


def transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model inside the task model (the backbone, under peft's
    wrappers when a method has been applied)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def kernel(model: nn.Module) -> str | None:
    backbone = transformers_model(model)
    return getattr(getattr(backbone, "config", None), "_attn_implementation", None)


def set_kernel(model: nn.Module, name: str) -> bool:
    """Switch the backbone's attention kernel in place; False when the architecture cannot
    (transformers then warns and keeps the loaded one)."""
    backbone = transformers_model(model)
    if backbone is None:
        return False
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warning is replaced by the record's "why"
    try:
        backbone.set_attn_implementation(name)
    except (ValueError, ImportError):
        return False
    finally:
        hf_logging.set_verbosity(verbosity)
    return kernel(model) == name


def eager_extra_bytes(config: Any, batch_size: int, max_length: int) -> int:
    """What eager keeps beyond sdpa for the backward pass of one batch: attention scores and
    probabilities, batch x heads x length^2, in fp32, in every layer (an upper bound: bf16
    autocast halves it)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return -1  # unknown architecture: cannot be bounded
    return int(layers * batch_size * heads * max_length ** 2 * 4 * 2)


def available_bytes(device: str) -> int:
    """Memory free for the run: the GPU's free memory, or the system's MemAvailable."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to tell
        return 0


def measure(model: nn.Module, batches: Batches, device: str, bf16: bool = False
            ) -> dict[str, float]:
    """Seconds of a forward and backward pass of `model` with each kernel: per batch the median
    of precision.REPEATS passes (alternating kernels, after one warm-up each), weighted over
    `batches` (`adaptune.precision.probe_batches`). Leaves the model on sdpa, gradients cleared
    and the random state as it was."""
    timed = time_passes(model, batches, device, [(name, bf16) for name in COMPARED], set_kernel)
    return {f"{name}_s": timed[name, bf16] for name in COMPARED} | batch_facts(batches)


def from_precision_probe(figures: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """The kernels' figures in `precision` from a precision probe that timed both kernels in
    both precisions (None where it timed one kernel)."""
    by_kernel = figures.get("by_kernel") or {}
    if not all(name in by_kernel for name in COMPARED):
        return None
    return ({f"{name}_s": by_kernel[name][f"{precision}_s"] for name in COMPARED}
            | {k: figures[k] for k in ("tokens", "padded_share") if k in figures})


def not_measured_because(requested: str, loaded: str | None, switchable: bool, eager_bytes: int,
                         available: int) -> str | None:
    """Why the kernel is not measured whatever the run's length or the cache (None: it may be)."""
    if requested != "auto":
        return "asked for"
    if loaded != "sdpa" or not switchable:
        return (f"transformers loaded {loaded} and this architecture offers no sdpa/eager "
                "choice after loading")
    if eager_bytes < 0 or eager_bytes > MEMORY_SHARE * available:
        bound = "cannot be bounded for this architecture" if eager_bytes < 0 else (
            f"would need up to {eager_bytes / 2**20:,.0f} MB more for the longest batch, over "
            f"{MEMORY_SHARE:.0%} of the {available / 2**20:,.0f} MB available")
        return f"eager's memory {bound}: sdpa kept"
    return None


def decide(requested: str, *, loaded: str | None, switchable: bool, steps: int, device: str,
           key_parts: dict[str, Any], eager_bytes: int, available: int,
           measure_fn: Callable[[], dict[str, float]] | None) -> tuple[str | None, dict[str, Any]]:
    """(kernel to train with, record for metrics.json). `loaded`: the kernel transformers
    resolved; `measure_fn` runs `measure` (None with several processes)."""
    record: dict[str, Any] = {"requested": requested, "loaded": loaded}

    def keep(why: str) -> tuple[str | None, dict[str, Any]]:
        return loaded, {**record, "picked": loaded, "why": why}

    reason = not_measured_because(requested, loaded, switchable, eager_bytes, available)
    if reason:
        return keep(reason)
    # (Measurements over one median batch, before both kinds of batch were timed, are not reused.)
    key = cache_key(device, {**key_parts, "probe": "padded and unpadded batches"})
    figures, source = cached(CACHE_FILE, key)[1], "cached measurement"
    if figures is None:
        if measure_fn is None:
            return keep("several processes and no cached measurement: transformers' choice")
        if steps < UNMEASURED_MIN_STEPS:
            return keep(f"{steps} steps and no measurement for this model here: runs under "
                        f"{UNMEASURED_MIN_STEPS} steps keep transformers' choice")
        figures, source = measure_and_store(CACHE_FILE, key, measure_fn), "measured now"
    picked, why = faster(figures, "sdpa", "eager", MARGIN, source)
    return picked, {**record, "picked": picked, "figures": figures, "source": source,
                    "why": why}


def options(requested: str, model: nn.Module, *, device: str, batch_size: int,
            max_length: int) -> dict[str, Any]:
    """What `decide` needs to know of the model and the machine (switching kernels to test
    whether the architecture can)."""
    loaded = kernel(model)
    switchable = (requested == "auto" and loaded == "sdpa" and set_kernel(model, "eager")
                  and set_kernel(model, "sdpa"))
    backbone = transformers_model(model)
    return {"loaded": loaded, "switchable": switchable,
            "eager_bytes": eager_extra_bytes(getattr(backbone, "config", None), batch_size,
                                             max_length),
            "available": available_bytes(device) if requested == "auto" and switchable else 0}


def worth_measuring(requested: str, opts: dict[str, Any], steps: int) -> bool:
    """Whether this run would measure the kernels if nothing were cached: then the precision
    probe times both kernels (see adaptune.precision)."""
    return (steps >= UNMEASURED_MIN_STEPS and not not_measured_because(
        requested, opts["loaded"], opts["switchable"], opts["eager_bytes"], opts["available"]))


def apply(requested: str, model: nn.Module, opts: dict[str, Any], *, steps: int, device: str,
          key_parts: dict[str, Any], measure_fn: Callable[[], dict[str, float]] | None
          ) -> dict[str, Any]:
    """Train `model` with the kernel `decide` picks (switched in place); returns the record.
    `opts`: `options(...)` of this model."""
    picked, record = decide(requested, steps=steps, device=device, key_parts=key_parts,
                            measure_fn=measure_fn, **opts)
    if picked and picked != kernel(model):
        set_kernel(model, picked)
    return record
