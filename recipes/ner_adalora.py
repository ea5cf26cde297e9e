"""NER with AdaLoRA: as ner_lora, with a rank budget re-allocated during training
(initial rank 12, target 8, on every attention and feed-forward matrix, as in the paper).

    accelerate launch recipes/ner_adalora.py [section.field=value ...]
"""

from adaptune.recipe import main
from ner_lora import PRESET as NER_LORA  # the script folder is on sys.path

PRESET = {
    **NER_LORA,
    "method": {"name": "adalora", "rank": 8, "init_rank": 12, "targets": ["all-linear"]},
    "output_dir": "runs/ner_adalora",
}

if __name__ == "__main__":
    main(PRESET, description=__doc__)
