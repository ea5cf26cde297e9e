"""Does domain-adaptive pretraining help? Task fine-tuning from the general checkpoint versus
after continued masked-LM pretraining (LoRA, merged) on in-domain text, same task budget, several
seeds; held-out domain perplexity before and after.

    python benchmarks/domain_adaptation.py [--seeds 3] [--domains bio,finance] [--out DIR]

Prints a Markdown table (mean and standard deviation over seeds) and writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adaptune.config import compose
from adaptune.domain import domain_stage
from adaptune.presets import DOMAIN_TASK
from adaptune.train import run

DOMAINS = {
    "bio": {"corpus": "bio", "tasks": [("ner", "bc5cdr", "f1"), ("ner", "ncbi_disease", "f1")]},
    "finance": {"corpus": "finance",
                "tasks": [("classification", "financial_phrasebank", "accuracy")]},
}


def task_run(model: str, task: str, dataset: str, seed: int, out: Path) -> dict:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    cfg = compose(DOMAIN_TASK, {
        "model": {"name": model}, "data": {"task": task, "dataset": dataset},
        "train": {"seed": seed}, "output_dir": str(out), "overwrite": True})
    return run(cfg).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--domains", default="bio,finance")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-domain")
    args = parser.parse_args()
    out = Path(args.out)
    summary = {}
    for name in args.domains.split(","):
        spec = DOMAINS[name]
        report_file = out / name / "domain.json"
        if report_file.exists():
            report = json.loads(report_file.read_text())
            adapted_model = report["merged_model"]
        else:
            folder, report = domain_stage(args.model, spec["corpus"], out / name)
            adapted_model = str(folder)
            report_file.write_text(json.dumps(report, indent=2))
        rows = []
        for task, dataset, metric in spec["tasks"]:
            scores = {"general": [], "adapted": []}
            for seed in range(1, args.seeds + 1):
                for kind, model in (("general", args.model), ("adapted", adapted_model)):
                    folder = out / name / f"{dataset}-{kind}-s{seed}"
                    m = task_run(model, task, dataset, seed, folder)
                    scores[kind].append(m["dev"][metric])
            rows.append({"task": task, "dataset": dataset, "metric": metric, **scores})
        summary[name] = {"domain": report, "tasks": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary, args)


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def print_table(summary: dict, args: argparse.Namespace) -> None:
    print(f"\nDomain-adaptive pretraining with {args.model}: masked LM with LoRA r=8 "
          f"(query/key/value/dense) for one epoch of the corpus, merged; then the task with LoRA "
          f"r=8, one epoch, lr 1e-3, {args.seeds} seeds (mean ± sample std).\n")
    print("| domain | corpus documents (dupes removed) | held-out perplexity before -> after |")
    print("|---|---|---|")
    for name, s in summary.items():
        d = s["domain"]
        print(f"| {name} | {d['documents_kept']:,} ({d['duplicates']:,}) | "
              f"{d['perplexity_before']:.2f} -> {d['perplexity_after']:.2f} |")
    print("\n| domain | task | dev metric | general checkpoint | after domain pretraining | gain |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        for r in s["tasks"]:
            gain = statistics.mean(r["adapted"]) - statistics.mean(r["general"])
            sd = max(statistics.stdev(r["adapted"]) if len(r["adapted"]) > 1 else 0,
                     statistics.stdev(r["general"]) if len(r["general"]) > 1 else 0)
            verdict = "within noise" if abs(gain) <= 2 * sd else ("gain" if gain > 0 else "loss")
            print(f"| {name} | {r['dataset']} | {r['metric']} | {_ms(r['general'])} | "
                  f"{_ms(r['adapted'])} | {gain:+.4f} ({verdict}) |")


if __name__ == "__main__":
    main()
