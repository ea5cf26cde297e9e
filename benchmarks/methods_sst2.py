"""Every adapter method on one budget: SST-2 dev accuracy, trainable parameters and wall time
for minilm-l6 with lora, adalora, bitfit, full and head, in fp32 and in bf16.

    python benchmarks/methods_sst2.py [--train 8000] [--epochs 1] [--out runs/bench-methods]

Prints a Markdown table; each run's full metrics stay in its folder under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaptune import finetune

# Learning rates per method: the usual ranges from the papers (LoRA/AdaLoRA ~1e-3 on small
# encoders, BitFit ~1e-3..1e-2, full fine-tuning ~1e-4, a linear probe higher still).
LR = {"lora": 1e-3, "adalora": 2e-3, "bitfit": 3e-3, "full": 1e-4, "head": 5e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--train", type=int, default=8000, help="training examples")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default=",".join(LR))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default="runs/bench-methods")
    args = parser.parse_args()

    rows = []
    for precision in args.precisions.split(","):
        for method in args.methods.split(","):
            out = Path(args.out) / f"{method}-{precision}"
            metrics_file = out / "metrics.json"
            if metrics_file.exists():  # finished earlier: reuse
                metrics = json.loads(metrics_file.read_text())
            else:
                metrics = finetune(args.model, task="classification", dataset="sst2",
                                   method=method, rank=args.rank, lr=LR[method],
                                   epochs=args.epochs, max_train_examples=args.train,
                                   max_length=64, precision=precision, output_dir=str(out),
                                   overwrite=True).metrics
            rows.append((method, precision, metrics))
    print(f"\nSST-2 dev ({rows[0][2]['dev_examples']} examples), {args.model}, "
          f"{args.train} training examples x {args.epochs} epoch(s), batch 32, rank {args.rank}\n")
    print("| method | precision | dev accuracy | macro-F1 | trainable params | % of total | "
          "wall time (s) | real tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for method, precision, m in rows:
        print(f"| {method} | {precision} | {m['dev']['accuracy']:.4f} | "
              f"{m['dev']['macro_f1']:.4f} | {m['trainable_params']:,} | "
              f"{m['trainable_percent']:.3f} | {m['wall_time_s']:.1f} | "
              f"{m['real_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
