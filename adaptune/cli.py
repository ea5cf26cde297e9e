"""The `adaptune` command.

    adaptune zoo list                 the offline model zoo
    adaptune zoo prepare minilm-l6    install and convert ahead of time
    adaptune train --config x.yaml section.field=value ...
    adaptune predict runs/x/adapter "some text" "more text"
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from adaptune.errors import AdaptuneError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune")
    sub = parser.add_subparsers(dest="command", required=True)
    zoo_p = sub.add_parser("zoo", help="list or prepare the offline model zoo")
    zoo_p.add_argument("action", choices=["list", "prepare"])
    zoo_p.add_argument("names", nargs="*", help="zoo models to prepare (default: all)")
    sub.add_parser("methods", help="list the adapter methods")
    train_p = sub.add_parser("train", help="run the training flow")
    train_p.add_argument("--config", help="YAML file of config overrides")
    train_p.add_argument("overrides", nargs="*", metavar="section.field=value")
    pred_p = sub.add_parser("predict", help="predict with a trained adapter")
    pred_p.add_argument("adapter_dir")
    pred_p.add_argument("texts", nargs="+")
    pred_p.add_argument("--merge", action="store_true", help="merge LoRA into the weights first")
    args = parser.parse_args(argv)
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
            from adaptune.recipe import run_from_args

            run_from_args({}, ([f"--config={args.config}"] if args.config else []) + args.overrides)
        else:
            from adaptune.api import load

            predictor = load(args.adapter_dir, merge=args.merge)
            for text, pred in zip(args.texts, predictor.predict(args.texts)):
                print(json.dumps({"input": text, "prediction": pred}))
    except AdaptuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
