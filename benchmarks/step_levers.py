"""What is left to gain inside one training step, lever by lever, on a throughput job.

Each lever runs in its own process. The process sets adaptune's run up for a job of
benchmarks/throughput.py as training would (`train.prepare`, `train.setup`: the model with its
method, the chosen precision and attention kernel, AdamW), takes BATCHES batches spread evenly
over the epoch's batch lengths and times `train.train_step` (forward, backward, clipping, the
optimizer step) on each, ROUNDS times. A batch's time is its fastest round: this project's hosts
change speed by up to a quarter within minutes, and other load can only slow a step down, never
speed it up. The step's time is the mean of those over the batches. Levers alternate with the
default path, REPEATS times, and the table gives each lever's mean over repeats and its ratio to
the default path's mean.

    python benchmarks/step_levers.py --job ner --repeats 2

Levers (each changes one thing from the default path):
  adaptune        the default path as a run sets it up (what the others are compared with)
  compiled        train.compile=on: each transformer block through torch.compile (dynamic
                  shapes), timed after one warm-up step on every batch (the warm-up is printed:
                  it is what a run would pay once)
  lora-addmm      LoRA's update added inside its second product (torch.addmm with the scaling as
                  alpha) instead of peft's product, scaling and sum: two full-size element-wise
                  passes fewer per LoRA layer, forward and backward (a candidate, not in adaptune)
  malloc-kept     glibc told to keep freed memory (GLIBC_TUNABLES mmap and trim thresholds), so
                  re-allocating activations costs no page faults
And one bound, not a lever:
  lora-first-target-only   LoRA on the job's first target (query, q_proj) only: backward still
                  runs through every block, so the difference to adaptune is what the other LoRA
                  layers cost, the most that any faster LoRA kernel could save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (the jobs' definitions, the peak and FLOPs per token)

LEVERS = ("compiled", "lora-addmm", "malloc-kept", "lora-first-target-only")
# glibc's dynamic mmap threshold otherwise returns large freed blocks to the system, and the
# next allocation of that size faults its pages in again.
MALLOC_KEPT = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def lora_addmm() -> None:
    """Replace peft's LoRA Linear forward, for the plain case (one active adapter, not merged,
    no variant such as DoRA, no extra arguments), by base + addmm(A x, B^T, alpha=scaling)."""
    from peft.tuners.lora import layer

    peft_forward = layer.Linear.forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.active_adapters
        if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
                or names[0] in self.lora_variant or names[0] not in self.lora_A):
            return peft_forward(self, x, *args, **kwargs)
        name = names[0]
        result = self.base_layer(x)
        low = self.lora_A[name](self.lora_dropout[name](x))
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                           self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return flat.view(result.shape)

    layer.Linear.forward = forward


def child(job_name: str, lever: str, seed: int, batches: int, rounds: int) -> dict[str, Any]:
    from adaptune.modeling import compile_blocks
    from adaptune.train import prepare, setup, train_step

    job = throughput.JOBS[job_name]
    variant: dict[str, Any] = {}
    if lever == "lora-first-target-only":
        variant["targets"] = job["targets"][:1]
    if lever == "lora-addmm":
        lora_addmm()
    config = throughput.adaptune_config(job, Path(tempfile.mkdtemp()), variant, seed)
    p = prepare(config)
    tr = setup(p)
    epoch = tr.sampler.batches(0)
    length = {i: len(p.train_features[i]["input_ids"]) for b in epoch for i in b}
    by_length = sorted(epoch, key=lambda b: max(length[i] for i in b))
    picked = [by_length[round(k * (len(by_length) - 1) / max(1, batches - 1))]
              for k in range(batches)]
    device = next(tr.model.parameters()).device
    inputs = [{k: v.to(device) for k, v in
               p.task.collate([p.train_features[i] for i in b], p.tokenizer.pad_token_id).items()}
              for b in picked]
    tr.model.train()
    warm_up = time.perf_counter()
    if lever == "compiled":
        compile_blocks(tr.model)
    for batch in inputs:  # every shape once: compiles, allocator and caches warm
        train_step(p, tr, batch, 1)
    warm_up = time.perf_counter() - warm_up
    fastest = [float("inf")] * len(inputs)
    for _ in range(rounds):
        for k, batch in enumerate(inputs):
            start = time.perf_counter()
            train_step(p, tr, batch, 1)
            fastest[k] = min(fastest[k], time.perf_counter() - start)
    return {"lever": lever, "step_s": statistics.mean(fastest), "warm_up_s": warm_up,
            "real_tokens_per_step": statistics.mean(int(b["attention_mask"].sum())
                                                    for b in inputs),
            "shapes": [list(b["input_ids"].shape) for b in inputs],
            "precision": tr.precision, "attention": tr.attention_record.get("picked"),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="ner", choices=sorted(throughput.JOBS))
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="", help="also write every process's figures to this "
                        "JSON file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.job, args.child, args.seed, args.batches,
                                           args.rounds)), flush=True)
        return
    levers = [x for x in args.levers.split(",") if x]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        parser.error(f"--levers: unknown {sorted(unknown)}; known: {', '.join(LEVERS)}")
    peak = throughput.matmul_peak(torch.float32)
    print(f"device: {throughput.device_name()}, {torch.get_num_threads()} threads; fp32 2048^3 "
          f"peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    order = [x for _ in range(args.repeats)
             for pair in zip(["adaptune"] * len(levers), levers) for x in pair]
    for position, lever in enumerate(order):
        env = dict(os.environ)
        if lever == "malloc-kept":
            env["GLIBC_TUNABLES"] = MALLOC_KEPT
        done = subprocess.run(
            [sys.executable, __file__, "--job", args.job, "--child", lever, "--seed",
             str(args.seed), "--batches", str(args.batches), "--rounds", str(args.rounds)],
            env=env, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"{lever} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        result = {**json.loads(line[-1][len("RESULT "):]), "order": position}
        results.setdefault(lever, []).append(result)
        print(f"  {lever}: {result['step_s'] * 1e3:.1f} ms a step "
              f"(warm-up {result['warm_up_s']:.1f} s)", flush=True)
    if args.out:  # to print the table again, or read the figures, later
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"peak": peak, "results": results}))
    print_table(args, results, peak)


def print_table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]],
                peak: float) -> None:
    job = throughput.JOBS[args.job]
    base = results["adaptune"][0]
    flops = throughput.flops_per_token(job["model"]) * base["real_tokens_per_step"]
    default = statistics.mean(r["step_s"] for r in results["adaptune"])
    print(f"\n### {args.job}: {job['model']}, LoRA r=8 on {'/'.join(job['targets'])}, batch "
          f"{job['batch']}, {base['precision']}, attention {base['attention']}; "
          f"{args.batches} batches of the seed-{args.seed} epoch ("
          f"{base['shapes'][0][1]}-{base['shapes'][-1][1]} tokens long, "
          f"{base['real_tokens_per_step']:.0f} real tokens a step on average), each step's "
          f"fastest of {args.rounds} rounds, {args.repeats} processes per lever, alternating\n")
    print("| lever | ms a step, per process | mean | vs adaptune's mean | vs the adaptune process "
          "just before (each, geometric mean) | model GFLOP/s | of the fp32 peak | warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for lever, runs in results.items():
        mean = statistics.mean(r["step_s"] for r in runs)
        each = " ".join(f"{r['step_s'] * 1e3:.1f}" for r in runs)
        # The host's speed moves between processes: the ratio to the default-path process that
        # ran just before each (they alternate) is the steadier reading.
        paired = [results["adaptune"][r["order"] // 2]["step_s"] / r["step_s"] for r in runs] \
            if lever != "adaptune" else []
        paired_text = (" ".join(f"{x:.3f}x" for x in paired)
                       + f" ({statistics.geometric_mean(paired):.3f}x)") if paired else "-"
        print(f"| {lever} | {each} | {mean * 1e3:.1f} | {default / mean:.3f}x | {paired_text} | "
              f"{flops / mean / 1e9:.1f} | {flops / mean / peak:.1%} | "
              f"{statistics.mean(r['warm_up_s'] for r in runs):.1f} |")
    print("\n(lora-first-target-only is a bound, not a lever: it trains fewer LoRA layers. "
          "Model FLOPs are 4 x the non-embedding parameters per real token, as in "
          "throughput.py.)")


if __name__ == "__main__":
    main()
