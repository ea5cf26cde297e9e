"""What every recipe script runs: defaults, then the recipe's preset (`adaptune.presets`), then a
YAML file, then command-line overrides, then the one training flow.

    python recipes/ner_lora.py train.lr=1e-3 method.rank=16
    accelerate launch recipes/ner_lora.py --config my.yaml output_dir=runs/x
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Sequence

from adaptune.config import compose, help_text, to_yaml
from adaptune.errors import AdaptuneError
from adaptune.presets import PRESETS
from adaptune.train import RunResult, run


def run_from_args(preset: Mapping[str, Any] | str, argv: Sequence[str] | None = None,
                  description: str = "", prog: str | None = None) -> RunResult | None:
    """Parse `--config` and overrides over `preset` (a preset name or partial config), run,
    print the report (or, with --print-config, print the resolved config only)."""
    parser = argument_parser(description, argparse.ArgumentParser(
        prog=prog, description=description or None))
    args = parser.parse_args(argv)
    layer = PRESETS[preset] if isinstance(preset, str) else preset
    config = compose(layer, yaml_path=args.config, overrides=args.overrides)
    if args.print_config:  # the resolved config, as YAML a --config file can take
        print(to_yaml(config), end="")
        return None
    result = run(config)
    report(result)
    return result


def argument_parser(description: str = "", parser: argparse.ArgumentParser | None = None
                    ) -> argparse.ArgumentParser:
    """The arguments of every training entry point, with every config field in --help."""
    parser = parser or argparse.ArgumentParser(description=description or None)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_text()
    parser.add_argument("--config", help="YAML file of config overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. train.lr=1e-3 method.rank=16")
    return parser


def main(preset: Mapping[str, Any] | str, argv: Sequence[str] | None = None,
         description: str = "") -> RunResult | None:
    """A recipe's entry point: user errors become one line on stderr and exit status 2."""
    try:
        return run_from_args(preset, argv, description)
    except AdaptuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and stops)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        release_process_group()


def release_process_group() -> None:
    """Under `accelerate launch`, tear the process group down once, before the interpreter
    exits: left to exit-time cleanup, a rank whose peer has already gone can wait forever (seen
    in CI with two CPU processes, after the run had finished and written its metrics). Called
    where a process's training ends (recipes, `adaptune train`), never inside `run`, which one
    script may call several times (as domain adaptation does)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def report(result: RunResult) -> None:
    from accelerate.state import PartialState

    if not PartialState().is_main_process:
        return
    m = result.metrics
    dev = m["dev"]
    print(f"\n{result.config.data.task} on {result.config.data.dataset} with "
          f"{result.config.model.name} + {result.config.method.name}: "
          f"{m['main_metric']} = {dev[m['main_metric']]:.4f} (best at step {m['best_step']})")
    for key, value in dev.items():
        if key != m["main_metric"]:
            print(f"  {key:<24} {value:.4f}")
    print(f"  trainable params         {m['trainable_params']:,} of {m['total_params']:,} "
          f"({m['trainable_percent']:.3f}%)")
    print(f"  wall time                {m['wall_time_s']:.1f} s, of which training "
          f"{m['train_time_s']:.1f} s ({m['precision']}, {m['real_tokens_per_s']:.0f} real "
          "tokens/s)")
    print(f"outputs: {result.output_dir}/ (config.json, metrics.json, adapter/)")
