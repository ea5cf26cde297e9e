"""Extractive QA with LoRA: minilm-l6 on SQuAD v2.0 (the 16 dev articles here: train on the
first 12, evaluate on the last 4), exact match and F1 with the HasAns / NoAns breakdown.

    accelerate launch recipes/qa_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

PRESET = {
    "model": {"name": "minilm-l6", "max_length": 256},
    "data": {"task": "qa", "dataset": "squad_v2_dev_part"},
    "method": {"name": "lora", "rank": 8, "targets": ["query", "key", "value", "dense"]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "eval_batch_size": 64},
    "output_dir": "runs/qa_lora",
}

if __name__ == "__main__":
    main(PRESET, description=__doc__)
