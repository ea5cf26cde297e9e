"""NER with LoRA: minilm-l6 on CoNLL-2003 (train -> dev), entity F1 per type.

    accelerate launch recipes/ner_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

PRESET = {
    "model": {"name": "minilm-l6", "max_length": 128},
    "data": {"task": "ner", "dataset": "conll2003"},
    "method": {"name": "lora", "rank": 8, "targets": ["query", "key", "value", "dense"]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3},
    "output_dir": "runs/ner_lora",
}

if __name__ == "__main__":
    main(PRESET, description=__doc__)
