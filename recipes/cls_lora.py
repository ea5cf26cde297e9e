"""Sentence classification with LoRA: minilm-l6 on SST-2 (train -> dev), accuracy and macro-F1.

    accelerate launch recipes/cls_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

if __name__ == "__main__":
    main("cls_lora", description=__doc__)  # the preset: adaptune/presets.py
