"""NER with AdaLoRA: as ner_lora, with a rank budget re-allocated during training
(initial rank 12, target 8, on every attention and feed-forward matrix, as in the paper).

    accelerate launch recipes/ner_adalora.py [section.field=value ...]
"""

from adaptune.recipe import main

if __name__ == "__main__":
    main("ner_adalora", description=__doc__)  # the preset: adaptune/presets.py
