"""Sentence classification with LoRA: minilm-l6 on SST-2 (train -> dev), accuracy and macro-F1.

    accelerate launch recipes/cls_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

PRESET = {
    "model": {"name": "minilm-l6", "max_length": 64},
    "data": {"task": "classification", "dataset": "sst2", "max_train_examples": 20000},
    "method": {"name": "lora", "rank": 8, "targets": ["query", "key", "value", "dense"]},
    "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
    "output_dir": "runs/cls_lora",
}

if __name__ == "__main__":
    main(PRESET, description=__doc__)
