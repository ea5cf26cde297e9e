"""`train.precision=auto`: fp32 or bf16 autocast, whichever trains this model faster on this
device, measured rather than assumed.

Whether bf16 pays is a property of the machine and the model's shapes, not of "CPUs" or
"GPUs": on one project machine a 2048^3 bf16 product ran at half the fp32 rate, on another
(AVX512-BF16) at 4.3x, and even there small models can lose the gain to the casts. So the
probe times what the run will do: forward and backward passes of the run's own model (its
method applied) in each precision, alternating, after one warm-up each; no optimizer step,
gradients cleared and the random state put back, so the run trains exactly as it would have
(tested). bf16 is picked when it is at least MARGIN faster and the device executes it natively.

What is timed (`probe_batches`, `measure`): of the run's first-epoch batches, the median one
among those with padding and among those without, each weighted by its kind's share of the
epoch. One median batch spoke for one kind only, and the kinds differ: a batch without padding
gives sdpa no mask and its fast path, and on smollm2-135m (Intel Xeon, AMX) bf16 with sdpa ran
1.08-1.14x fp32 on the median batch, which had no padding, but 1.03x over both kinds
(benchmarks/results/probe_kinds_xeon.md).

The precision and the attention kernel (adaptune.attention) are chosen together where the run
would measure the kernel: the probe then times both kernels in both precisions, and each
precision is judged by its faster kernel. Chosen one after the other, in sdpa, that model would
have stayed in fp32 although bf16 with eager ran 1.34x faster than anything in fp32: eager's
padded batches gained 1.4-1.5x from bf16, sdpa's nothing. The answer is cached per device (CPU model
and bf16 support, or GPU name), torch version, threads, model, method, task, batch size and the
kernels compared in `$ADAPTUNE_CACHE/precision.json`, so the probe (8 to 32 passes) is paid once.

With several processes the probe is not run (they would time each other): a cached answer is
used, else the rule measured on this project's machines (bf16 on GPUs for models of at least 50M
non-embedding parameters, fp32 otherwise). bf16 is autocast: master weights, optimizer state and
losses stay fp32; no method here has a measured accuracy loss under it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

MARGIN = 1.10  # bf16 must be at least 10% faster to be chosen
REPEATS = 3  # timed passes per precision (after one warm-up each)
BF16_MIN_PARAMS = 50_000_000  # the fallback rule's threshold (non-embedding parameters)


def native_bf16(device: str) -> bool:
    if device == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):  # no CUDA driver
            return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def device_key(device: str) -> str:
    """The device as the cache knows it: GPU name, or CPU model name with its bf16 support."""
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_model()}, native bf16 {native_bf16('cpu')}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; what Python knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CACHE_FILE = "precision.json"


@contextmanager
def kept_random_state(device: str) -> Iterator[None]:
    """Random numbers drawn inside (dropout) are given back: the run draws as if nothing ran."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if device == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def timed_pass(model: nn.Module, batch: dict[str, torch.Tensor], device: str,
               bf16: bool = False) -> float:
    """Seconds of one forward and backward pass (gradients cleared after)."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.float().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return elapsed


Batches = list[tuple[dict[str, torch.Tensor], float]]  # (batch, its weight): probe_batches


def time_passes(model: nn.Module, batches: Batches, device: str,
                combinations: list[tuple[str | None, bool]],
                switch: Callable[[nn.Module, str], Any] | None = None
                ) -> dict[tuple[str | None, bool], float]:
    """Seconds of a forward and backward pass per (attention kernel, bf16) combination: per
    batch the median of REPEATS passes after one warm-up, the combinations alternating within
    each round, weighted over `batches`. A kernel of None leaves the model's own; others are
    set with `switch`, and the model's first kernel is put back. Leaves no trace: gradients
    cleared, random state restored."""
    times: dict[tuple[str | None, bool, int], list[float]] = {}
    first = next((k for k, _ in combinations if k is not None), None)
    with kept_random_state(device):
        try:
            for repeat in range(REPEATS + 1):
                for index, (batch, _) in enumerate(batches):
                    for kernel, bf16 in combinations:
                        if kernel is not None and switch is not None:
                            switch(model, kernel)
                        elapsed = timed_pass(model, batch, device, bf16)
                        if repeat:  # the first pass of each is a warm-up
                            times.setdefault((kernel, bf16, index), []).append(elapsed)
        finally:
            if first is not None and switch is not None:
                switch(model, first)
    return {(kernel, bf16): sum(weight * statistics.median(times[kernel, bf16, index])
                                for index, (_, weight) in enumerate(batches))
            for kernel, bf16 in combinations}


def batch_facts(batches: Batches) -> dict[str, Any]:
    """What the figures were measured on: tokens (padded) and the padded batches' weight."""
    return {"tokens": sum(int(b["attention_mask"].numel()) for b, _ in batches),
            "padded_share": sum(w for b, w in batches if not bool(b["attention_mask"].all()))}


def measure(model: nn.Module, batches: Batches, device: str,
            kernels: tuple[str | None, ...] = (None,),
            switch: Callable[[nn.Module, str], Any] | None = None) -> dict[str, Any]:
    """Seconds of a forward and backward pass in fp32 and in bf16 autocast, each with the
    fastest of `kernels` (None: the model's own kernel), over the weighted `batches`; with
    several kernels, every kernel's figures too (`by_kernel`)."""
    timed = time_passes(model, batches, device,
                        [(k, bf16) for k in kernels for bf16 in (False, True)], switch)
    figures: dict[str, Any] = {"fp32_s": min(timed[k, False] for k in kernels),
                               "bf16_s": min(timed[k, True] for k in kernels)}
    if len(kernels) > 1:
        figures["by_kernel"] = {str(k): {"fp32_s": timed[k, False], "bf16_s": timed[k, True]}
                                for k in kernels}
    return figures | batch_facts(batches)


def cached(name: str, key: str) -> tuple[dict[str, Any], Any]:
    """(the cache file `name` in the cache folder as a dict, its entry for `key` or None); a
    damaged file reads as empty (measured again, not trusted)."""
    from adaptune.zoo import cache_dir

    path = cache_dir() / name
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        cache = {}
    return cache, cache.get(key)


def store(name: str, cache: dict[str, Any]) -> None:
    from adaptune.safe_io import write_json
    from adaptune.zoo import cache_dir

    try:
        write_json(cache_dir() / name, cache)
    except OSError:  # a read-only cache folder costs a measurement per run, nothing else
        pass


def measure_and_store(name: str, key: str, measure_fn: Callable[[], dict[str, Any]]
                      ) -> dict[str, Any]:
    """`measure_fn()`'s figures, stored under `key` in the cache file `name`."""
    cache, _ = cached(name, key)
    figures = measure_fn()
    cache[key] = figures
    store(name, cache)
    return figures


def faster(figures: dict[str, float], incumbent: str, challenger: str, margin: float,
           source: str) -> tuple[str, str]:
    """(the kernel or precision to use, why): `challenger` only where its measured pass
    (figures["<name>_s"]) is at least `margin` times faster than the incumbent's."""
    ratio = figures[f"{incumbent}_s"] / max(1e-12, figures[f"{challenger}_s"])
    return (challenger if ratio > margin else incumbent,
            f"{challenger} ran {ratio:.2f}x the speed of {incumbent} on this run's model and "
            f"probe batches ({source}); {challenger} is picked from {margin:.2f}x")


def cache_key(device: str, key_parts: dict[str, Any]) -> str:
    return json.dumps({"device": device_key(device), "torch": torch.__version__, **key_parts},
                      sort_keys=True)


def fallback(device: str, non_embedding_params: int) -> str:
    """The rule used without a probe (several processes, nothing cached)."""
    if device == "cuda" and native_bf16("cuda"):
        return "bf16" if non_embedding_params >= BF16_MIN_PARAMS else "fp32"
    return "fp32"


def choose(requested: str, *, device: str, key_parts: dict[str, Any],
           probe: Callable[[], dict[str, float]] | None, non_embedding_params: int
           ) -> tuple[str, dict[str, Any]]:
    """(precision, record for metrics.json). `probe` runs `measure` on the run's model and
    batch; None when it must not run (several processes)."""
    record: dict[str, Any] = {"requested": requested}
    if requested != "auto":
        return requested, {**record, "picked": requested, "why": "asked for"}
    if not native_bf16(device):
        return "fp32", {**record, "picked": "fp32", "why": "no native bf16 on this device"}
    key = cache_key(device, key_parts)
    figures, source = cached(CACHE_FILE, key)[1], "cached measurement"
    if figures is None and probe is None:
        picked = fallback(device, non_embedding_params)
        return picked, {**record, "picked": picked,
                        "why": "several processes and no cached probe: the fallback rule"}
    if figures is None:
        figures, source = measure_and_store(CACHE_FILE, key, probe), "measured now"
    picked, why = faster(figures, "fp32", "bf16", MARGIN, source)
    if "by_kernel" in figures:
        why += (f"; each precision with the faster of the attention kernels "
                f"{', '.join(sorted(figures['by_kernel']))}")
    return picked, {**record, "picked": picked, "probe": figures, "source": source,
                    "why": why, "device": device_key(device)}


def probe_batches(task: Any, features: list[dict], sampler: Any, pad_token_id: int,
                  device: str) -> Batches:
    """The batches the probes time, each with its weight: of the run's first-epoch batches, the
    median-length one among those with padding and among those without, weighted by that
    kind's share of the epoch (one batch of weight 1 where the epoch has one kind)."""
    batches = sampler.batches(0)
    kinds: dict[bool, list[list[int]]] = {}
    for batch in batches:
        lengths = {len(features[i]["input_ids"]) for i in batch}
        kinds.setdefault(len(lengths) > 1, []).append(batch)
    probes = []
    for padded, group in sorted(kinds.items()):
        group = sorted(group, key=lambda b: max(len(features[i]["input_ids"]) for i in b))
        collated = task.collate([features[i] for i in group[len(group) // 2]], pad_token_id)
        probes.append(({k: v.to(device) for k, v in collated.items()}, len(group) / len(batches)))
    return probes
