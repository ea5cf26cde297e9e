"""The `adaptune` command.

    adaptune zoo list                 the offline model zoo
    adaptune zoo prepare minilm-l6    install and convert ahead of time
    adaptune train --config x.yaml section.field=value ...
    adaptune predict runs/x/adapter "some text" "more text"
    adaptune sweep benchmarks/grids/sst2_encoders.yaml --out results/sst2 [--workers 2] [--pack K]
    adaptune report results/sst2          tables, CSV, plots and scaling-law fits
    adaptune advise results/sst2 --model minilm-l6 --within 0.01 [--confidence 0.8] [--backtest]
    adaptune advise results/sst2 --model minilm-l6 --fresh-seeds   after a backtest: on all seeds
    adaptune backtests results/sst2 results/conll   every backtest together: hit rate, calibration
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from adaptune.errors import AdaptuneError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune")
    sub = parser.add_subparsers(dest="command", required=True)
    zoo_p = sub.add_parser("zoo", help="list or prepare the offline model zoo")
    zoo_p.add_argument("action", choices=["list", "prepare"])
    zoo_p.add_argument("names", nargs="*", help="zoo models to prepare (default: all)")
    sub.add_parser("methods", help="list the adapter methods")
    # `train` takes the recipes' own arguments (handled before this parser, below).
    sub.add_parser("train", help="run the training flow (adaptune train --help: every field)",
                   add_help=False)
    pred_p = sub.add_parser("predict", help="predict with a trained adapter")
    pred_p.add_argument("adapter_dir")
    pred_p.add_argument("texts", nargs="+")
    pred_p.add_argument("--merge", action="store_true", help="merge LoRA into the weights first")
    pred_p.add_argument("--quantized-merge", default="refuse",
                        choices=["refuse", "dequantize", "requantize"],
                        help="with --merge on a 4/8-bit base: de-quantize and merge (and "
                             "quantize again); prints the error that adds")
    pred_p.add_argument("--trusted", action="store_true",
                        help="load an adapter folder that records no checksums")
    adapt_p = sub.add_parser("adapt", help="domain-adaptive pretraining: continue pretraining "
                             "a model on in-domain text with an adapter, merge it")
    adapt_p.add_argument("model", help="zoo name, Hub id or folder")
    adapt_p.add_argument("corpus", help="a named corpus, text/JSONL files, 'task' (TAPT: the "
                         "task's own training text) or '<corpus>+task' (DAPT, then TAPT)")
    adapt_p.add_argument("--out", required=True, help="output folder")
    adapt_p.add_argument("--task", default="", help="with 'task' corpora: the task")
    adapt_p.add_argument("--dataset", default="", help="with 'task' corpora: its data set")
    adapt_p.add_argument("overrides", nargs="*", metavar="section.field=value",
                         help="overrides of the domain stage (adaptune.presets.DOMAIN_STAGE)")
    export_p = sub.add_parser("export", help="a trained adapter as a plain transformers "
                              "folder (pipeline-ready) or an ONNX file")
    export_p.add_argument("adapter", help="adapter folder, or the run folder holding adapter/")
    export_p.add_argument("out", help="folder (transformers) or .onnx file to write")
    export_p.add_argument("--to", choices=["transformers", "onnx"], default="transformers")
    merge_p = sub.add_parser("merge", help="combine LoRA adapters trained on one base")
    merge_p.add_argument("out", help="folder for the merged adapter")
    merge_p.add_argument("adapters", nargs="+", help="adapter folders (two or more)")
    merge_p.add_argument("--combination", default="cat",
                         help="cat (exact weighted sum of the updates; ranks add up), linear "
                         "(peft: averaged factors, equal ranks), ties, dare_linear, dare_ties")
    merge_p.add_argument("--weights", default="", help="comma-separated (default: equal)")
    merge_p.add_argument("--density", type=float, default=0.5, help="ties/dare: share kept")
    merge_p.add_argument("--head", type=int, default=None,
                         help="keep the task head of adapter number HEAD (0-based)")
    sweep_p = sub.add_parser("sweep", help="run (or finish) a benchmark grid")
    sweep_p.add_argument("grid", help="grid YAML file (see benchmarks/grids/)")
    sweep_p.add_argument("--out", required=True, help="results folder")
    sweep_p.add_argument("--workers", type=int, default=1,
                         help="cells run at once (one per GPU; on a CPU they share the cores)")
    sweep_p.add_argument("--launcher", choices=["local", "ray"], default="local",
                         help="local worker processes, or Ray tasks (pip install adaptune[ray])")
    sweep_p.add_argument("--address", default=None,
                         help="with --launcher ray: an existing Ray cluster (default: local)")
    sweep_p.add_argument("--pack", type=int, default=1,
                         help="train up to K compatible LoRA cells at once on one copy of the "
                         "base (each recorded as its own cell)")
    report_p = sub.add_parser("report", help="tables, CSV, plots and fits of a results folder")
    report_p.add_argument("results")
    report_p.add_argument("--out", default="", help="where to write (default: the results folder)")
    report_p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    advise_p = sub.add_parser("advise", help="which method and rank to use, from a results folder")
    advise_p.add_argument("results")
    advise_p.add_argument("--model", required=True)
    advise_p.add_argument("--within", type=float, default=0.01,
                          help="tolerated gap to the best mean metric (0.01: one point)")
    advise_p.add_argument("--fraction", type=float, default=1.0)
    advise_p.add_argument("--confidence", type=float, default=None,
                          help="pick the cheapest cell within the tolerance in at least this "
                          "share of simulated replications (say 0.8), not on point means")
    advise_p.add_argument("--backtest", action="store_true",
                          help="re-run the pick and its rivals on seeds the grid never used and "
                          "say whether the pick held (records under RESULTS/backtest/)")
    advise_p.add_argument("--fresh-seeds", action="store_true",
                          help="rank with the backtest's fresh seeds added to the grid's (the "
                          "pick and its rivals on twice the seeds; no longer a backtest)")
    advise_p.add_argument("--seeds", default="1000,1001,1002",
                          help="fresh seeds for --backtest (comma-separated)")
    tally_p = sub.add_parser("backtests", help="the advisor's backtests of several results "
                             "folders together: how often its promise held, against its "
                             "own predictions")
    tally_p.add_argument("results", nargs="+")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[1:] if argv[:1] == ["train"] else []
    args, extra = parser.parse_known_args(argv[:1] if argv[:1] == ["train"] else argv)
    if args.command == "adapt" and all("=" in e for e in extra):
        args.overrides += extra  # overrides after the options (argparse stops at the first)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "zoo":
            from adaptune import zoo

            if args.action == "list":
                print(zoo.describe_zoo())
            else:
                for name in args.names or list(zoo.ZOO):
                    print(f"{name}: {zoo.prepare(name)}")
        elif args.command == "methods":
            from adaptune.methods import describe_methods

            print(describe_methods())
        elif args.command == "train":
            from adaptune.recipe import release_process_group, run_from_args

            try:  # the recipes' own arguments, --help (every config field) included
                run_from_args({}, rest, "the training flow on defaults < --config YAML < "
                              "section.field=value overrides", prog="adaptune train")
            finally:
                release_process_group()
        elif args.command == "adapt":
            from adaptune.config import parse_overrides
            from adaptune.domain import adapt

            folder, reports = adapt(args.model, args.corpus, args.out, task=args.task,
                                    dataset=args.dataset,
                                    overrides=parse_overrides(args.overrides))
            for report in reports:
                print(f"{report['stage']} on {report['corpus']}: held-out perplexity "
                      f"{report['perplexity_before']:.2f} -> {report['perplexity_after']:.2f} "
                      f"({report['steps']} steps, {report['wall_time_s']:.0f} s)")
            print(f"adapted model: {folder} (train a task on it with model.name={folder})")
        elif args.command == "export":
            from adaptune.export import export_onnx, export_transformers

            folder = Path(args.adapter)
            folder = folder / "adapter" if (folder / "adapter").is_dir() else folder
            exporter = export_onnx if args.to == "onnx" else export_transformers
            print(exporter(folder, args.out)[1])
        elif args.command == "merge":
            from adaptune.merging import merge_adapters

            weights = [float(w) for w in args.weights.split(",") if w] or None
            print(merge_adapters(args.adapters, args.out, combination=args.combination,
                                 weights=weights, density=args.density, head=args.head))
        elif args.command == "sweep":
            from adaptune.sweep import load_grid, run_grid

            print(run_grid(load_grid(args.grid), args.out, workers=args.workers,
                           launcher=args.launcher, address=args.address, pack=args.pack))
        elif args.command == "report":
            from adaptune.report import write_report

            print(write_report(args.results, args.out or args.results, args.bootstrap))
        elif args.command == "advise":
            from adaptune.advisor import advise, backtest

            print(advise(args.results, args.model, args.within, args.fraction,
                         confidence=args.confidence, fresh_seeds=args.fresh_seeds))
            if args.backtest:
                seeds = [int(s) for s in args.seeds.split(",") if s]
                summary = backtest(args.results, args.model, args.within, seeds, args.fraction,
                                   confidence=args.confidence)
                verdict = {True: "held", False: "did NOT hold", None: "undecided"}[
                    summary["held"]]
                close = {True: f"within {args.within:g} of", None: "not yet compared with",
                         False: f"NOT within {args.within:g} of"}[summary["within_best"]]
                print(f"backtest on seeds {seeds}: the pick {verdict}; it is {close} the best "
                      "re-run cell (fresh means: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in summary["fresh_means"].items())
                      + ")")
        elif args.command == "backtests":
            from adaptune.advisor import tally_lines

            print("\n".join(tally_lines(args.results)))
        else:
            from adaptune.api import load

            predictor = load(args.adapter_dir, merge=args.merge,
                             quantized_merge=args.quantized_merge, trusted=args.trusted)
            if predictor.merge_report:
                print(json.dumps({"merge_report": predictor.merge_report}), file=sys.stderr)
            for text, pred in zip(args.texts, predictor.predict(args.texts)):
                print(json.dumps({"input": text, "prediction": pred}))
    except AdaptuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and stops)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
