"""Summarization: ROUGE of a decoder fine-tuned with LoRA against the same model without
fine-tuning, on the same dev examples, prompt and decoding.

    python benchmarks/summarization_gain.py [--train 200] [--dev 30] [section.field=value ...]
"""

from __future__ import annotations

import argparse

from adaptune.config import compose
from adaptune.presets import PRESETS
from adaptune.train import evaluate_untrained, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--dev", type=int, default=30)
    parser.add_argument("--out", default="runs/bench-summarization")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose(PRESETS["summarize_lora"],  # the recipe's settings, unchanged
                  overrides=[f"data.max_train_examples={args.train}",
                             f"data.max_dev_examples={args.dev}", f"output_dir={args.out}",
                             "overwrite=true", *args.overrides])
    before = evaluate_untrained(cfg)
    result = run(cfg)
    after = result.metrics["dev"]
    print(f"\n{cfg.model.name} on {cfg.data.dataset}: {result.metrics['train_examples']} training "
          f"documents, {result.metrics['dev_examples']} dev documents, max length "
          f"{cfg.model.max_length}, {cfg.generation.num_beams}-beam decoding of up to "
          f"{cfg.generation.max_new_tokens} tokens; LoRA r={cfg.method.rank} on "
          f"{'/'.join(cfg.method.targets)}, {result.metrics['optimizer_steps']} steps\n")
    print("| model | ROUGE-1 | ROUGE-2 | ROUGE-L |")
    print("|---|---|---|---|")
    for name, m in (("no fine-tuning", before), ("LoRA fine-tuned", after)):
        print(f"| {name} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} |")
    print(f"\ntraining wall time {result.metrics['train_time_s']:.0f} s; trainable parameters "
          f"{result.metrics['trainable_params']:,} of {result.metrics['total_params']:,}")


if __name__ == "__main__":
    main()
