"""Does continued pretraining help the task? Gururangan et al. (2020)'s four arms on four tasks
of three domains, with paired seeds: the task fine-tuned from the general checkpoint, after
domain-adaptive pretraining (DAPT: masked LM with LoRA on the domain corpus, merged), after
task-adaptive pretraining (TAPT: the same on the task's own training text, labels stripped) and
after both (DAPT, then TAPT on its result). For one task the DAPT adapter is also stacked (kept
frozen under the task adapter) instead of merged.

    python benchmarks/domain_adaptation.py [--tasks bc5cdr,ncbi_disease,...] [--seeds 5]
        [--work runs/bench-domain] [--out benchmarks/results/domain_cpu] [--threads N]
    python benchmarks/domain_adaptation.py --report   # the table from what has run so far

Resumable across sessions: every finished pretraining stage and task run leaves a small record
under --out/records (committed with the table), and a run whose record exists is skipped, so a
killed invocation -- or a later session on a fresh checkout -- continues where it stopped. Model
folders and adapters stay under --work (not committed); a stage whose task runs are all recorded
is not run again, and one that must run again for missing task runs (its model folder gone) is
checked against its record: the same held-out perplexity, or the benchmark stops. Two
invocations on disjoint --tasks can share the machine (the bio tasks share one DAPT stage: keep
them in one invocation). --out gets summary.json and the Markdown table.

Protocol: each pretraining stage runs once (seed 0) and chooses its own budget: up to
PRETRAIN_EPOCHS epochs, stopped by held-out perplexity on documents carved from its corpus
(never trained on); "perplexity before/after" is measured on a second held-out slice. Task runs:
the same recipe for every arm (LoRA r=8 on query/key/value/dense, lr 1e-3, batch 32, the epochs of
TASK_EPOCHS), seeds 1..N paired across arms; the gain of an arm is the mean over seeds of
(arm - general) at the same seed, with a 95% t interval. So the interval covers task-seed noise
only, not the variation of the pretraining stage itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from adaptune.config import compose
from adaptune.domain import adapt, adapt_and_finetune
from adaptune.presets import DOMAIN_TASK
from adaptune.report import t_interval
from adaptune.safe_io import write_json
from adaptune.sweep import code_version, device_name
from adaptune.train import run

# dataset -> (task, domain corpus, headline dev metric). legal_unfair_tos is 90% "Other":
# accuracy says little there, so its headline is macro-F1 over its nine classes.
# The medical DAPT corpus is the PubMed abstracts alone: the named "bio" corpus also holds the
# training sentences of BC5CDR and NCBI-disease, which would make DAPT contain TAPT's text.
TASKS: dict[str, tuple[str, str, str]] = {
    "bc5cdr": ("ner", "pubmed", "f1"),
    "ncbi_disease": ("ner", "pubmed", "f1"),
    "financial_phrasebank": ("classification", "finance", "accuracy"),
    "legal_unfair_tos": ("classification", "legal", "macro_f1"),
}
ARMS = ("general", "dapt", "tapt", "dapt+tapt")
STACK_TASK = "financial_phrasebank"  # the task on which DAPT is also carried by "stack"
PRETRAIN_EPOCHS = 2
# Budget of the domain stage: stop on held-out perplexity (three evaluations an epoch, patience
# 2), at most PRETRAIN_EPOCHS epochs -- a cap set by this CPU (a masked-LM step of 32 x 128 tokens
# takes about 10 s on one core), reported where it binds. Checkpoints: a killed stage resumes.
# The backbone keeps its checkpoint's dropout in every stage and task run, as when the committed
# table was measured (before model.dropout=auto turned it off for adapters): a stage run again
# must reproduce its record.
KEEP_DROPOUT = {"model": {"dropout": "checkpoint"}}
PRETRAIN = {**KEEP_DROPOUT, "data": {"selection_examples": 200},
            "train": {"epochs": PRETRAIN_EPOCHS, "evals_per_epoch": 3,
                      "early_stopping_patience": 2, "checkpoint_every": 10}}
# Task epochs: one over the NER sets' 4.5-5.4k sentences; the small classification sets get
# more passes so that the rare classes of legal_unfair_tos are learnt at all.
TASK_EPOCHS = {"bc5cdr": 1, "ncbi_disease": 1, "financial_phrasebank": 2,
               "legal_unfair_tos": 3}
# legal_unfair_tos trains with class-balanced loss: with the plain loss every arm learnt the
# majority class only (dev macro-F1 0.105 on general and DAPT, seed 1; balanced: 0.559).
TASK_DATA = {"legal_unfair_tos": {"class_weights": "balanced"}}


def _threads(n: int) -> dict[str, Any]:
    return {"train": {"num_threads": n}}


def _commit() -> str:
    """The commit of the code that produced a record (a table's runs come from one code
    version; each record says which)."""
    version = code_version()
    return (version["commit"] or "unknown")[:7] + ("+dirty" if version["dirty"] else "")


def pretrain(model: str, corpus: str, work: Path, records: Path, threads: int, commit: str,
             dataset: str = "") -> dict:
    """One pretraining stage (skipped when its model folder is there); returns its domain.json
    report and keeps its record. A stage run again in a later session must reproduce its
    record's held-out perplexity, or the task runs after it would not share one model."""
    report_file = work / "domain.json"
    record_file = records / "pretrain" / f"{work.name}.json"
    if not report_file.exists():
        task = TASKS[dataset][0] if dataset else ""
        overrides = {**PRETRAIN, "train": {**PRETRAIN["train"], "num_threads": threads}}
        adapt(model, corpus, str(work), task=task, dataset=dataset, overrides=overrides)
    report = json.loads(report_file.read_text())
    if record_file.exists():
        recorded = json.loads(record_file.read_text())
        before, now = recorded["perplexity_after"], report["perplexity_after"]
        if abs(before - now) > 1e-3 * before:
            raise SystemExit(f"{record_file}: the stage run again reached held-out perplexity "
                             f"{now:.4f}, its record says {before:.4f}; the task runs recorded "
                             "after it came from another model. Move the records away to "
                             "start this task over.")
    else:
        write_json(record_file, {**_stage(report), "code": commit,
                                 "threads": threads})
    return report


def task_record(records: Path, dataset: str, name: str, seed: int) -> Path:
    return records / dataset / f"{name}-s{seed}.json"


def task_metrics(dataset: str, seed: int, out: Path, threads: int, *, domain_model: Path | None,
                 base: str, carry: str = "merge") -> dict:
    """One task run; returns its metrics.json."""
    task = TASKS[dataset][0]
    overrides = {**KEEP_DROPOUT, "data": TASK_DATA.get(dataset, {}),
                 "train": {"seed": seed, "epochs": TASK_EPOCHS[dataset], "num_threads": threads}}
    if domain_model is None:
        cfg = compose(DOMAIN_TASK, {"model": {"name": base},
                                    "data": {"task": task, "dataset": dataset},
                                    "output_dir": str(out), "overwrite": True}, overrides)
        return run(cfg).metrics
    return adapt_and_finetune(base, "", task, dataset, output_dir=str(out), carry=carry,
                              domain_model=domain_model, task_overrides=overrides).task


def run_tasks(args: argparse.Namespace) -> None:
    work, records, commit = Path(args.work), Path(args.out) / "records", _commit()
    for dataset in args.tasks.split(","):
        _, domain, _ = TASKS[dataset]
        arms = [(arm, "merge") for arm in ARMS]
        if dataset == STACK_TASK:
            arms.append(("dapt", "stack"))
        todo = [(seed, arm, carry) for seed in range(1, args.seeds + 1) for arm, carry in arms
                if not task_record(records, dataset, arm if carry == "merge" else
                                   f"{arm}-{carry}", seed).exists()]
        if not todo:
            continue
        dapt = pretrain(args.model, domain, work / "pretrain" / domain, records, args.threads,
                        commit)
        tapt = pretrain(args.model, "task", work / "pretrain" / f"{dataset}-tapt", records,
                        args.threads, commit, dataset)
        both = pretrain(dapt["merged_model"], "task",
                        work / "pretrain" / f"{dataset}-dapt+tapt", records, args.threads,
                        commit, dataset)
        models = {"general": None, "dapt": Path(dapt["merged_model"]),
                  "tapt": Path(tapt["merged_model"]), "dapt+tapt": Path(both["merged_model"])}
        for seed, arm, carry in todo:
            name = arm if carry == "merge" else f"{arm}-{carry}"
            out = work / "tasks" / dataset / f"{name}-s{seed}"
            m = task_metrics(dataset, seed, out, args.threads, domain_model=models[arm],
                             base=args.model, carry=carry)
            write_json(task_record(records, dataset, name, seed),
                       {"dev": m["dev"], "wall_time_s": m["wall_time_s"], "seed": seed,
                        "precision": m["precision"], "code": commit,
                        "threads": args.threads})
            print(f"done {dataset} {name} seed {seed}", flush=True)


# ---------------------------------------------------------------------------------------------
# The table: read every finished run back.


def _stage(report: dict) -> dict:
    keys = ("stage", "corpus", "documents_kept", "train_documents", "heldout_documents",
            "perplexity_before", "perplexity_after", "steps", "wall_time_s", "stopped_early",
            "precision")
    return {k: report.get(k) for k in keys}


def collect(args: argparse.Namespace) -> dict:
    records = Path(args.out) / "records"
    summary: dict[str, Any] = {"model": args.model, "seeds": args.seeds,
                               "task_epochs": TASK_EPOCHS, "pretrain": PRETRAIN,
                               "machine": device_name(),
                               "tasks": {}}
    codes: set[str] = set()
    precisions: set[str] = set()
    for dataset, (task, domain, metric) in TASKS.items():
        stages = {}
        for arm, folder in (("dapt", domain), ("tapt", f"{dataset}-tapt"),
                            ("dapt+tapt", f"{dataset}-dapt+tapt")):
            record = records / "pretrain" / f"{folder}.json"
            if record.exists():
                stages[arm] = json.loads(record.read_text())
                codes.add(stages[arm].get("code", "unknown"))
                precisions.add(stages[arm].get("precision", "unrecorded"))
        arms: dict[str, Any] = {}
        for name in (*ARMS, "dapt-stack"):
            scores, times, seeds = [], [], []
            for seed in range(1, args.seeds + 1):
                record = task_record(records, dataset, name, seed)
                if record.exists():
                    m = json.loads(record.read_text())
                    scores.append(m["dev"][metric])
                    times.append(m["wall_time_s"])
                    seeds.append(seed)
                    codes.add(m.get("code", "unknown"))
                    precisions.add(m.get("precision", "unrecorded"))
            if scores:
                arms[name] = {"seeds": seeds, "dev": scores, "task_wall_s": times}
        summary["tasks"][dataset] = {"task": task, "domain": domain, "metric": metric,
                                     "pretraining": stages, "arms": arms}
    summary["code_versions"] = sorted(codes)
    summary["precisions"] = sorted(precisions)
    return summary


def _pretrain_seconds(stages: dict, arm: str) -> float:
    base = arm.removesuffix("-stack")
    if base == "general":
        return 0.0
    if base == "dapt+tapt":
        return stages["dapt"]["wall_time_s"] + stages["dapt+tapt"]["wall_time_s"]
    return stages[base]["wall_time_s"]


def gain_row(general: dict, arm: dict) -> tuple[float, float, float, int] | None:
    """Mean paired gain over the seeds both arms have, with its 95% t interval."""
    g = dict(zip(general["seeds"], general["dev"]))
    diffs = [score - g[s] for s, score in zip(arm["seeds"], arm["dev"]) if s in g]
    if len(diffs) < 2:
        return None
    low, high = t_interval(diffs)
    return statistics.mean(diffs), low, high, len(diffs)


def render(summary: dict) -> str:
    lines = [f"Continued pretraining before the task, {summary['model']}, "
             f"{summary['machine']}, no GPU. Pretraining: masked LM, LoRA r=8 "
             f"(query/key/value/dense), lr 1e-3, batch 32, blocks of 128 tokens, at most "
             f"{PRETRAIN_EPOCHS} epochs stopped by held-out perplexity (200 documents carved "
             "from the corpus; patience 2 of three evaluations an epoch), merged. Task: LoRA r=8, "
             "lr 1e-3, batch 32, epochs per task as listed, seeds paired across arms; "
             "legal_unfair_tos with class-balanced loss (data.class_weights=balanced). Precision: "
             f"{', '.join(summary['precisions']) or '-'} (train.precision=auto: the probe's "
             "choice on this CPU). Code: "
             f"{', '.join(summary['code_versions']) or 'no runs yet'} (each record names its "
             "commit).", "",
             "### Pretraining stages (seed 0)", "",
             "| task | arm | corpus | documents (train / held out) | steps ((cap): the epoch cap "
             "bound, not the perplexity) | held-out perplexity "
             "before -> after | time s |", "|---|---|---|---|---|---|---|"]
    for dataset, t in summary["tasks"].items():
        for arm, s in t["pretraining"].items():
            if arm == "dapt" and dataset == "ncbi_disease":
                continue  # the same PubMed stage as bc5cdr's
            corpus = ("the task's training text, labels stripped"
                      if s["corpus"].endswith("tapt-corpus.jsonl") else s["corpus"])
            lines.append(
                f"| {dataset if arm != 'dapt' else t['domain'] + ' (all its tasks)'} | {arm} | "
                f"{corpus} | {s['train_documents']:,} / {s['heldout_documents']:,} | "
                f"{s['steps']}{'' if s.get('stopped_early') else ' (cap)'} | "
                f"{s['perplexity_before']:.1f} -> {s['perplexity_after']:.1f} | "
                f"{s['wall_time_s']:.0f} |")
    lines += ["", "\"Before\" is the masked-LM head fitted alone on the stage's corpus with the "
              "encoder frozen (the zoo encoder ships no such head), at the same budget; for "
              "dapt+tapt it is measured on the DAPT model.", "",
              "### Task dev metric by arm (mean ± sample std over seeds) and paired gain over "
              "the general checkpoint (95% t interval)", "",
              "| task (metric, epochs) | arm | seeds | dev | gain vs general [95% CI] | verdict "
              "| pretraining s | task s / seed |", "|---|---|---|---|---|---|---|---|"]
    for dataset, t in summary["tasks"].items():
        general = t["arms"].get("general")
        for name, a in t["arms"].items():
            sd = statistics.stdev(a["dev"]) if len(a["dev"]) > 1 else 0.0
            cell = f"{statistics.mean(a['dev']):.4f} ± {sd:.4f}"
            gain, verdict = "", ""
            row = gain_row(general, a) if general and name != "general" else None
            if row:
                mean, low, high, n = row
                gain = f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"
                verdict = ("within noise" if low <= 0 <= high else
                           "gain beyond noise" if low > 0 else "loss beyond noise")
            try:
                pre = f"{_pretrain_seconds(t['pretraining'], name):.0f}"
            except KeyError:
                pre = "?"
            lines.append(f"| {dataset} ({t['metric']}, {TASK_EPOCHS[dataset]}) | "
                         f"{name.replace('-stack', ' (stacked)')} | {len(a['dev'])} | {cell} | "
                         f"{gain} | {verdict} | {pre} | "
                         f"{statistics.mean(a['task_wall_s']):.0f} |")
    lines += ["", "The interval is over task seeds only (each pretraining stage ran once); "
              "dapt+tapt's pretraining time adds both stages. The medical DAPT corpus is the "
              "PubMed abstracts of PubMedQA (not the tasks' own sentences); the legal and "
              "finance corpora hold the training part of their tasks' fixed splits besides "
              "other text of the domain (LegalBench overruling; SEC loan agreements), so their "
              "DAPT text overlaps their TAPT text."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--work", default="runs/bench-domain")
    parser.add_argument("--out", default="benchmarks/results/domain_cpu")
    parser.add_argument("--report", action="store_true", help="only write the table")
    args = parser.parse_args()
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        parser.error(f"--tasks: unknown {sorted(unknown)}; known: {', '.join(TASKS)}")
    if not args.report:
        run_tasks(args)
    summary = collect(args)
    out = Path(args.out)
    write_json(out / "summary.json", summary)
    table = render(summary)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
