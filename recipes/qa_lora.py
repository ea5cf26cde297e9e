"""Extractive QA with LoRA: minilm-l6 on SQuAD v2.0 (the 16 dev articles here: train on the
first 12, evaluate on the last 4), exact match and F1 with the HasAns / NoAns breakdown.

    accelerate launch recipes/qa_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

if __name__ == "__main__":
    main("qa_lora", description=__doc__)  # the preset: adaptune/presets.py
