"""Training throughput: adaptune against Hugging Face `Trainer` + `peft` on the same model, data,
method and number of steps, in one invocation.

    python benchmarks/throughput.py              # every job, every contender (bf16: if native)
    python benchmarks/throughput.py --jobs ner --out runs/bench-throughput

Each contender runs in its own subprocess (so peak memory is its own), one after another,
alternating between adaptune and Trainer. For each it prints wall time, real and padded tokens
per second, peak memory and the final dev metric, then the ratios against both Trainer runs,
model FLOP/s over real tokens and that as a fraction of the matrix-product peak measured on this
machine in the same run.

Each finished run is kept under `--out` and reused by a later invocation with the same job,
contender, seed and `--threads`: a stopped benchmark resumes, and seeds run in separate
invocations are gathered into one table by a last one that names them all (the table says
which runs it reused). Kept runs are not tied to a code version: after changing adaptune, use a
fresh `--out` to measure it.

The Trainer baseline is what a user would otherwise write: `AutoModelFor*` + `get_peft_model`
with the same LoRA config + `Trainer` with the same batch size, learning rate, warm-up and
epochs, in four configurations: its defaults (random batches) in fp32 and with `bf16=True`, and
as an informed user configures it, with length-grouped batches
(`train_sampling_strategy="group_by_length"`), in fp32 and bf16. adaptune is compared with each
and with the fastest of them. Its dev metric is scored in dataset order (under length grouping
transformers 5 also reorders `trainer.predict`'s rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from adaptune.config import RunConfig
from adaptune.report import t_interval
from adaptune.sweep import device_name

# Both contenders train the same LoRA: r=8, alpha 16, dropout 0 (peft's default and adaptune's).
# Until 2026-12-02 the Trainer runs used lora_dropout=0.1, which costs a CPU step about half its
# speed (the adaptune-dropout lever): ratios committed before then compare different LoRAs.
JOBS: dict[str, dict[str, Any]] = {
    # The job of the performance issue: minilm-l6, LoRA r=8 on query/key/value/dense, CoNLL-2003
    # train, batch 32, max length 128, lr 1e-3, 50 warm-up steps then linear decay, one epoch.
    "ner": {"model": "minilm-l6", "task": "ner", "dataset": "conll2003", "max_length": 128,
            "targets": ["query", "key", "value", "dense"], "batch": 32, "lr": 1e-3,
            "warmup_steps": 50, "train_examples": 0, "lora_dropout": 0.0},
    "cls": {"model": "minilm-l6", "task": "classification", "dataset": "sst2", "max_length": 64,
            "targets": ["query", "key", "value", "dense"], "batch": 32, "lr": 1e-3,
            "warmup_steps": 50, "train_examples": 20000, "lora_dropout": 0.0},
    "decoder": {"model": "smollm2-135m", "task": "classification", "dataset": "sst2",
                "max_length": 64, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "batch": 16, "lr": 5e-4, "warmup_steps": 10, "train_examples": 2000,
                "dev_examples": 0, "lora_dropout": 0.0},
}
TRAINERS = ("trainer-fp32", "trainer-bf16", "trainer-grouped-fp32", "trainer-grouped-bf16")
CONTENDERS = ("adaptune", *TRAINERS)
# Run only when named: the length-grouped fp32 Trainer with the backbone's dropout off (every
# rate of its config at 0, passed to from_pretrained), as adaptune trains adapters by default
# (model.dropout=auto), so that lever is not credited to adaptune alone.
EXTRA_TRAINERS = ("trainer-grouped-fp32-no-dropout",
                  # ...and with eager attention too (attn_implementation="eager"), where adaptune's
                  # model.attention=auto picks it: every lever adaptune pulls by default, pulled on
                  # Trainer's side as well, in each precision.
                  "trainer-grouped-fp32-eager-no-dropout", "trainer-grouped-bf16-eager-no-dropout")


# ----------------------------------------------------------------------------------------------
# One contender, in its own process.


# adaptune's default path, and single levers changed from it (to measure what each is worth).
ADAPTUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "adaptune": {},
    "adaptune-fp32": {"precision": "fp32"},
    "adaptune-bf16": {"precision": "bf16"},
    "adaptune-random-batches": {"group_by_length": False},  # lever: length-grouped batches
    "adaptune-dropout": {"dropout": 0.1},  # lever: LoRA dropout 0 against a common 0.1
    "adaptune-compile": {"train": {"compile": True}},  # lever: torch.compile of the blocks
    # lever: the attention kernel. adaptune measures sdpa (transformers' choice for these
    # models) against eager and takes the faster (model.attention=auto); each one forced:
    "adaptune-eager-attention": {"attention": "eager"},
    "adaptune-sdpa-attention": {"attention": "sdpa"},
    # lever: the frozen backbone's own dropout, off by default for adapters (model.dropout=auto;
    # its random masks were 11% of a CPU NER step), kept here at the checkpoint's 0.1.
    # (adaptune-no-backbone-dropout, before that default, ran the same as adaptune now.)
    "adaptune-backbone-dropout": {"backbone_dropout": "checkpoint"},
}


def adaptune_config(job: dict[str, Any], out: Path, variant: dict[str, Any], seed: int,
                    threads: int = 0) -> RunConfig:
    """The run adaptune trains for `job` with `variant`'s levers changed."""
    from adaptune import finetune_config
    from adaptune.tasks import task_class

    n_train = job["train_examples"]
    # The job's warm-up is a number of steps (as Trainer's warmup_steps); adaptune takes a
    # ratio of the run's steps, so convert it with the run's real length.
    data = RunConfig().replace(data={"task": job["task"], "dataset": job["dataset"],
                                     "max_train_examples": n_train}, train={"seed": seed}).data
    steps = math.ceil(len(task_class(job["task"])().load(data, "train", seed)) / job["batch"])
    warmup_ratio = (job["warmup_steps"] + 0.5) / steps
    settings = {"method": "lora", "rank": 8, "targets": job["targets"], "lr": job["lr"],
                "epochs": 1, "batch_size": job["batch"], "max_length": job["max_length"],
                "max_train_examples": n_train, "max_dev_examples": job.get("dev_examples", 0),
                "seed": seed, "output_dir": str(out), "overwrite": True,
                "dropout": job["lora_dropout"], **variant,
                "train": {"num_threads": threads, "warmup_ratio": warmup_ratio,
                          **variant.get("train", {})}}
    return finetune_config(job["model"], task=job["task"], dataset=job["dataset"], **settings)


def run_adaptune(job: dict[str, Any], out: Path, variant: dict[str, Any], seed: int,
                 threads: int = 0) -> dict[str, Any]:
    from adaptune import run

    m = run(adaptune_config(job, out, variant, seed, threads)).metrics
    steps = m["optimizer_steps"]
    return {"wall_s": m["train_time_s"], "real_tokens": m["train_real_tokens"],
            "padded_tokens": m["train_padded_tokens"], "dev": m["dev"][m["main_metric"]],
            "precision": m["precision"], "steps": steps,
            "precision_choice": m.get("precision_choice"), "compile_choice":
            m.get("compile_choice"), "attention": m.get("attention"),
            "attention_choice": m.get("attention_choice")}


def run_trainer(job: dict[str, Any], out: Path, bf16: bool, seed: int,
                grouped: bool = False, no_dropout: bool = False,
                eager: bool = False) -> dict[str, Any]:
    """The baseline a user would write with transformers + peft."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from adaptune.config import RunConfig
    from adaptune.train import prepare

    # The same resolved model, seeded draw of training examples and tokenization as adaptune's
    # run with this seed.
    p = prepare(RunConfig().replace(
        model={"name": job["model"], "max_length": job["max_length"]},
        data={"task": job["task"], "dataset": job["dataset"],
              "max_train_examples": job["train_examples"],
              "max_dev_examples": job.get("dev_examples", 0)},
        train={"seed": seed}))
    path, tokenizer, labels = p.run.model.path, p.tokenizer, p.labels
    task, dev, train_f, dev_f = p.task, p.dev_examples, p.train_features, p.dev_features
    def strip(feats: list[dict]) -> list[dict]:  # adaptune's bookkeeping keys are not inputs
        return [{k: v for k, v in f.items() if not k.startswith("_")} for f in feats]

    # With no_dropout, every dropout rate of the config at 0, as a transformers user writes it.
    from transformers import AutoConfig

    from adaptune.modeling import dropout_keys
    overrides: dict[str, Any] = ({k: 0.0 for k in dropout_keys(AutoConfig.from_pretrained(path))}
                                 if no_dropout else {})
    if eager:  # the attention kernel, as a transformers user passes it
        overrides["attn_implementation"] = "eager"
    if job["task"] == "ner":
        model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(labels),
                                                                **overrides)
        collate = DataCollatorForTokenClassification(tokenizer)
        task_type = TaskType.TOKEN_CLS
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels),
                                                                   **overrides)
        model.config.pad_token_id = tokenizer.pad_token_id
        collate = DataCollatorWithPadding(tokenizer)
        task_type = TaskType.SEQ_CLS
    model = get_peft_model(model, LoraConfig(task_type=task_type, r=8, lora_alpha=16,
                                             lora_dropout=job["lora_dropout"],
                                             target_modules=job["targets"]))
    counts = {"real": 0, "padded": 0}

    def counting_collate(features):
        batch = collate(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["attention_mask"].numel()
        return batch

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=job["batch"],
        per_device_eval_batch_size=128, learning_rate=job["lr"],
        warmup_steps=job["warmup_steps"], num_train_epochs=1, weight_decay=0.01,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
        eval_strategy="no", logging_steps=10**6, seed=seed, dataloader_num_workers=0,
        disable_tqdm=True, train_sampling_strategy="group_by_length" if grouped else "random")
    trainer = Trainer(model=model, args=args, train_dataset=strip(train_f),
                      data_collator=counting_collate, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    real, padded = counts["real"], counts["padded"]
    # Dev metric with adaptune's scorer on the Trainer model's predictions.
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(dev_f), 128):
            batch = collate(strip(dev_f[i:i + 128]))
            batch.pop("labels", None)
            with torch.autocast("cuda" if torch.cuda.is_available() else "cpu",
                                dtype=torch.bfloat16, enabled=bf16):
                logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            preds += logits.argmax(-1).tolist()
    metrics = task.score(dev, dev_f, preds, labels)
    return {"wall_s": wall, "real_tokens": real, "padded_tokens": padded,
            "dev": metrics[task.main_metric], "precision": "bf16" if bf16 else "fp32",
            "steps": trainer.state.global_step}


def _child(job_name: str, contender: str, out: Path, seed: int, threads: int) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    job = JOBS[job_name]
    folder = out / f"{job_name}-{contender}-s{seed}"
    if contender.startswith("adaptune"):
        result = run_adaptune(job, folder, ADAPTUNE_VARIANTS[contender], seed, threads)
    else:
        result = run_trainer(job, folder, "-bf16" in contender, seed,
                             grouped="grouped" in contender,
                             no_dropout=contender.endswith("no-dropout"),
                             eager="-eager" in contender)
    if torch.cuda.is_available():
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(threads=threads, job=job)
    # Kept for reuse by a restarted (or wider) invocation; the thread setting is part of the
    # name because timings taken with one thread beside other work are not the machine's.
    (folder / f"result-t{threads}.json").write_text(json.dumps(result))
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Where adaptune's training time goes (--profile): what bounds the speed that is left.


def op_category(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matrix products"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention kernel"
    if name.startswith("aten::_foreach") or name.startswith("Optimizer."):
        return "optimizer (AdamW)"
    if name in ("aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::clone",
                "aten::contiguous", "aten::embedding_dense_backward", "aten::fill_",
                "aten::zero_", "aten::empty", "aten::empty_strided", "aten::to", "aten::_to_copy"):
        return "copies, indexing, allocation"
    if not name.startswith("aten::"):  # autograd nodes, record_function ranges: bookkeeping
        return "autograd and profiler ranges"
    return "element-wise, norms, softmax, loss"


def profile_adaptune(job_name: str, out: Path, steps: int, threads: int,
                     variant: str = "adaptune") -> None:
    """Profile adaptune's job twice, for 10 and 10 + `steps` optimizer steps, and print the
    difference by kind of operator: model loading, tokenization and evaluation cost the same in
    both and cancel, leaving `steps` training steps. Time outside any operator is Python and
    framework work (the training loop, peft's and accelerate's wrappers, collation).
    `variant` (an ADAPTUNE_VARIANTS name) profiles a lever forced, e.g. eager attention, which a
    run this short would not measure for itself.

    Then what bounds the model FLOP rate: the profiler counts each matrix product's FLOPs, so
    the rate while in matrix products, against the machine's peak measured here, and the share
    of the step spent in them multiply to the rate over the whole step. Which of the two is
    short says where speed is left: a low share points at the element-wise work and the
    framework, a low rate at the matrix products' shapes (the table of the costliest shapes)."""
    from torch.profiler import ProfilerActivity, profile

    job = JOBS[job_name]
    # One unprofiled warm-up run first: train.precision=auto and train.compile=auto measure
    # once per machine and cache the answer, and that one-time cost must not land in the
    # 10-step run alone (it made the difference below smaller than its parts: shares > 100%).
    warm = run_adaptune({**job, "dev_examples": 32}, out / f"profile-{job_name}-warmup",
                        {**ADAPTUNE_VARIANTS[variant], "max_steps": 2}, seed=42,
                        threads=threads)
    dtype = torch.bfloat16 if warm["precision"] == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    totals = []
    for n in (10, 10 + steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                     with_flops=True) as prof:
            start = time.perf_counter()
            run_adaptune({**job, "dev_examples": 32}, out / f"profile-{job_name}-{n}",
                         {**ADAPTUNE_VARIANTS[variant], "max_steps": n}, seed=42,
                         threads=threads)
            wall = time.perf_counter() - start
        by_kind: dict[str, float] = {}
        # (product, its operands' shapes) -> [calls, seconds, FLOPs]
        products: dict[tuple[str, tuple], list[float]] = {}
        for event in prof.key_averages(group_by_input_shape=True):
            kind = op_category(event.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + event.self_cpu_time_total / 1e6
            if kind == "matrix products":
                shapes = tuple(tuple(shape) for shape in event.input_shapes)
                row = products.setdefault((event.key, shapes), [0, 0.0, 0.0])
                row[0] += event.count
                row[1] += event.self_cpu_time_total / 1e6
                row[2] += event.flops or 0
        by_kind["outside operators (Python, framework)"] = wall - sum(by_kind.values())
        totals.append((wall, by_kind, products))
    wall = totals[1][0] - totals[0][0]
    attention = (warm.get("attention_choice") or {}).get("picked", "-")
    print(f"\n### profile: adaptune on {job_name}, {steps} training steps "
          f"({wall / steps:.3f} s per step under the profiler, {warm['precision']}, "
          f"attention {attention}{'' if variant == 'adaptune' else ', variant ' + variant})\n")
    print("| where the time goes | seconds | share |")
    print("|---|---|---|")
    kinds = sorted(totals[1][1], key=lambda k: -(totals[1][1][k] - totals[0][1].get(k, 0.0)))
    negative = []
    for kind in kinds:
        seconds = totals[1][1][kind] - totals[0][1].get(kind, 0.0)
        negative += [kind] if seconds < -0.02 * wall else []  # beyond timer noise
        print(f"| {kind} | {seconds:.2f} | {seconds / wall:.0%} |")
    if negative:
        # A negative difference means the two runs did unequal one-time work (a cache filled
        # in one only, another process on the cores): the shares are then not to be read.
        print(f"\nWARNING: negative difference for {', '.join(negative)}: the 10-step and "
              f"{10 + steps}-step runs did not do the same one-time work; rerun on idle cores.")
    # The training steps' matrix products: the longer run's less the shorter's, per shape.
    diff = {key: [row[i] - totals[0][2].get(key, [0, 0.0, 0.0])[i] for i in range(3)]
            for key, row in totals[1][2].items()}
    diff = {key: row for key, row in diff.items() if row[0] > 0}
    mm_seconds = sum(row[1] for row in diff.values())
    mm_flops = sum(row[2] for row in diff.values())
    if mm_seconds <= 0 or mm_flops <= 0:
        return
    in_products, share = mm_flops / mm_seconds, mm_seconds / wall
    print(f"\nWhat bounds the FLOP rate ({warm['precision']} 2048^3 peak measured before "
          f"profiling: {peak / 1e9:.0f} GFLOP/s): the matrix products ran "
          f"{mm_flops / 1e9:.1f} GFLOP in {mm_seconds:.2f} s, {in_products / 1e9:.0f} GFLOP/s "
          f"= **{in_products / peak:.0%} of the peak while in them**, and took "
          f"**{share:.0%} of the step**; over the whole step {mm_flops / wall / 1e9:.0f} "
          f"GFLOP/s = {share:.0%} x {in_products / peak:.0%} = {mm_flops / wall / peak:.0%} "
          f"of the peak (the profiler's own overhead included).\n")
    # Skinny products (an operand dimension of 64 or less: LoRA's A and B at its rank, the
    # per-head products of eager attention) cannot reach the peak at any size: a separate line.
    skinny = [row for (_, shapes), row in diff.items() if _smallest_dim(shapes) <= 64]
    sk_seconds, sk_flops = sum(r[1] for r in skinny), sum(r[2] for r in skinny)
    if sk_seconds > 0:
        print(f"Skinny products (an operand dimension of 64 or less: LoRA's A and B, eager "
              f"attention's per-head products): {sk_seconds:.2f} s = {sk_seconds / wall:.0%} "
              f"of the step for {sk_flops / mm_flops:.0%} of the matrix FLOPs, at "
              f"{sk_flops / sk_seconds / 1e9:.0f} GFLOP/s; the others "
              f"{(mm_flops - sk_flops) / max(mm_seconds - sk_seconds, 1e-9) / 1e9:.0f} "
              f"GFLOP/s.\n")
    print("| costliest matrix products | input shapes | calls | seconds | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|")
    for (name, shapes), (calls, seconds, flops) in sorted(diff.items(),
                                                           key=lambda kv: -kv[1][1])[:10]:
        rate = flops / seconds if seconds > 0 else 0.0
        print(f"| {name} | {[list(shape) for shape in shapes]} | {calls:.0f} | "
              f"{seconds:.2f} | {rate / 1e9:.0f} | {rate / peak:.0%} |")


def _smallest_dim(shapes: tuple) -> int:
    """The smallest dimension of a product's matrix operands, from the profiler's shapes
    (e.g. ((384,), (800, 384), (384, 8), (), ()): the bias and scalars are not operands)."""
    return min((d for shape in shapes if len(shape) >= 2 for d in shape), default=0)


# ----------------------------------------------------------------------------------------------
# The parent: peak matmul rates, contenders in subprocesses, the table.


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matrix product: the practical peak the ratio is taken against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(model: str) -> float:
    """Model FLOPs per trained token with a frozen base: forward 2N plus backward through the
    activations 2N (no weight gradients for frozen weights), N = non-embedding parameters;
    LoRA's own FLOPs are under 2% of that and left out."""
    from adaptune import zoo
    from adaptune.modeling import count_backbone_params, load_backbone
    from adaptune.spec import resolve_model

    if model in zoo.ZOO:
        return 4.0 * zoo.ZOO[model].non_embedding_params
    spec = resolve_model(model)
    return 4.0 * count_backbone_params(load_backbone(spec.path, spec.family))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="ner,cls,decoder")
    parser.add_argument("--contenders", default="", help="comma-separated (default: adaptune "
                        "and the four Trainer configurations; the bf16 ones only where the "
                        "device runs bf16 natively)")
    parser.add_argument("--out", default="runs/bench-throughput")
    parser.add_argument("--model", default="", help="replace every job's model (a zoo name, "
                        "Hub id or folder), e.g. where the zoo cannot be installed")
    parser.add_argument("--batch", type=int, default=0, help="replace every job's batch size")
    parser.add_argument("--train-examples", type=int, default=0, help="replace every job's "
                        "number of training sentences (0 keeps each job's own: all of "
                        "CoNLL-2003, 20,000 or 2,000 of SST-2), e.g. to time a run long enough "
                        "for model.attention=auto to measure")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: "
                        "all cores; fewer only for accuracy runs beside other work: the timings "
                        "are then not the machine's)")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds; each contender runs "
                        "once per seed (same seeded data draw for every contender)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead of the comparison, profile adaptune's path on each job for "
                        "STEPS training steps and print where the time goes")
    parser.add_argument("--profile-variant", default="adaptune", metavar="VARIANT",
                        help="with --profile: which adaptune variant (e.g. "
                        "adaptune-eager-attention)")
    parser.add_argument("--child", nargs=3, metavar=("JOB", "CONTENDER", "SEED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    for job in JOBS.values():
        job.update({"model": args.model} if args.model else {})
        job.update({"batch": args.batch} if args.batch else {})
        job.update({"train_examples": args.train_examples} if args.train_examples else {})
    if args.child:
        _child(args.child[0], args.child[1], out, int(args.child[2]), args.threads)
        return
    if args.profile:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        for job_name in args.jobs.split(","):
            profile_adaptune(job_name, out, args.profile, args.threads,
                             args.profile_variant)
        return
    unknown = [c for c in args.contenders.split(",")
               if c and c not in (*ADAPTUNE_VARIANTS, *CONTENDERS, *EXTRA_TRAINERS)]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from "
                     f"{sorted({*ADAPTUNE_VARIANTS, *CONTENDERS, *EXTRA_TRAINERS})}")

    from adaptune.precision import native_bf16

    torch.set_num_threads(os.cpu_count() or 1)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    native = native_bf16(kind)
    # Without native bf16 (no AVX512-BF16/AMX on a CPU) bf16 products are emulated at about a
    # hundredth of the fp32 rate (1 GFLOP/s against 150 on this project's AVX2 EPYC): a 2048^3
    # product takes minutes, and a bf16 Trainer run hours. No informed user picks bf16 there,
    # so neither the peak nor those contenders are measured unless named.
    peaks = {"fp32": matmul_peak(torch.float32)}
    if native:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    contenders = args.contenders or ",".join(c for c in CONTENDERS if native or "bf16" not in c)
    device = device_name()
    print(f"device: {device}; matrix-product peak (2048^3): fp32 {peaks['fp32'] / 1e9:.0f} "
          f"GFLOP/s, " + (f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s" if native else
                          "bf16 not native here (emulated; bf16 contenders left out unless "
                          "named)"))
    seeds = [int(s) for s in args.seeds.split(",")]
    for job_name in args.jobs.split(","):
        results: dict[str, list[dict]] = {}
        reused = []
        for seed in seeds:  # alternate contenders within each seed
            for contender in contenders.split(","):
                kept = out / f"{job_name}-{contender}-s{seed}" / f"result-t{args.threads}.json"
                earlier = json.loads(kept.read_text()) if kept.exists() else {}
                if earlier.get("job") == JOBS[job_name]:  # same job, threads, contender, seed
                    results.setdefault(contender, []).append(earlier)
                    reused.append(f"{contender}/seed {seed}")
                    continue
                proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--model",
                                       args.model, "--batch", str(args.batch),
                                       "--train-examples", str(args.train_examples), "--threads",
                                       str(args.threads), "--child",
                                       job_name, contender, str(seed)], capture_output=True,
                                      text=True, env={**os.environ, "ADAPTUNE_PROGRESS": "0"})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")),
                            None)
                if line is None:
                    print(f"{job_name}/{contender}/seed {seed} failed:\n{proc.stderr[-3000:]}")
                    continue
                results.setdefault(contender, []).append(json.loads(line[len("RESULT "):]))
        print_table(job_name, results, peaks, flops_per_token(JOBS[job_name]["model"]), seeds)
        if reused:  # say so: those runs did not alternate with the others in this invocation
            print(f"\n(runs kept from an earlier invocation of this command: {', '.join(reused)})")


def print_table(job_name: str, results: dict[str, list[dict]], peaks: dict[str, float],
                flops: float, seeds: list[int]) -> None:
    """One row per contender: timings are means over seeds, the dev metric is mean ± sample
    standard deviation; then each contender against each Trainer run (paired by seed)."""
    job = JOBS[job_name]
    print(f"\n### {job_name}: {job['model']}, {job['task']} on {job['dataset']}, LoRA r=8 on "
          f"{'/'.join(job['targets'])}, batch {job['batch']}, one epoch, seeds {seeds}\n")
    print("| contender | precision | steps | wall (s) | real tok/s | padded tok/s | padding | "
          "peak mem (MB) | dev (mean ± std) | dev per seed | model GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def mean(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    def rate(runs: list[dict]) -> float:
        return sum(r["real_tokens"] for r in runs) / sum(r["wall_s"] for r in runs)

    for name, runs in results.items():
        devs = [r["dev"] for r in runs]
        spread = statistics.stdev(devs) if len(devs) > 1 else 0.0
        gflops = rate(runs) * flops / 1e9
        padded = sum(r["padded_tokens"] for r in runs) / sum(r["wall_s"] for r in runs)
        padding = 1 - sum(r["real_tokens"] for r in runs) / sum(r["padded_tokens"] for r in runs)
        print(f"| {name} | {runs[0]['precision']} | {runs[0]['steps']} | "
              f"{mean(runs, 'wall_s'):.1f} | {rate(runs):,.0f} | {padded:,.0f} | {padding:.0%} | "
              f"{mean(runs, 'peak_memory_mb'):,.0f} | {statistics.mean(devs):.4f} ± {spread:.4f} "
              f"| {' '.join(f'{d:.4f}' for d in devs)} | {gflops:.1f} | "
              + (f"{gflops * 1e9 / peaks[runs[0]['precision']]:.1%} |"
                 if runs[0]["precision"] in peaks else "- |"))
    for name, runs in results.items():  # what adaptune's probes saw and chose, per run
        choices = [r.get("precision_choice") for r in runs if r.get("precision_choice")]
        if name.startswith("adaptune") and choices:
            c = choices[0]
            probe = c.get("probe") or {}
            figures = (f"probe fp32 {probe['fp32_s'] * 1e3:.1f} ms, bf16 "
                       f"{probe['bf16_s'] * 1e3:.1f} ms" if "fp32_s" in probe else
                       f"source {c.get('source')}")
            kernel = runs[0].get("attention_choice") or {}
            print(f"\n{name}: precision {runs[0]['precision']} ({figures}; {c.get('why', '')})"
                  f"; attention {runs[0].get('attention')} ({kernel.get('why', 'not recorded')})"
                  "; compiled: "
                  f"{(runs[0].get('compile_choice') or {}).get('compiled', 'n/a')}")
    trainers = {b: results[b] for b in (*TRAINERS, *EXTRA_TRAINERS) if b in results}
    fastest = max(trainers, key=lambda b: rate(trainers[b])) if trainers else None
    for name, ours in results.items():
        if not name.startswith("adaptune"):
            continue
        for base, theirs in trainers.items():
            if len(theirs) != len(ours):
                continue
            diffs = [a["dev"] - b["dev"] for a, b in zip(ours, theirs)]
            tag = " (the fastest Trainer)" if base == fastest else ""
            line = (f"\n{name} vs {base}{tag}: {rate(ours) / rate(theirs):.2f}x real-token "
                    f"throughput, {mean(theirs, 'wall_s') / mean(ours, 'wall_s'):.2f}x less wall "
                    f"time, dev {statistics.mean(diffs):+.4f}")
            if len(diffs) > 1:
                low, high = t_interval(diffs)
                line += (f" [95% t interval over {len(diffs)} paired seeds {low:+.4f}, "
                         f"{high:+.4f}]; per seed {' '.join(f'{d:+.4f}' for d in diffs)}")
            print(line)

if __name__ == "__main__":
    main()
