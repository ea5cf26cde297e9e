"""NER with LoRA: minilm-l6 on CoNLL-2003 (train -> dev), entity F1 per type.

    accelerate launch recipes/ner_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

if __name__ == "__main__":
    main("ner_lora", description=__doc__)  # the preset: adaptune/presets.py
