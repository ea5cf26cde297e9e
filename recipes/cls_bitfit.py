"""Sentence classification with BitFit (biases + head only): minilm-l6 on SST-2.

    accelerate launch recipes/cls_bitfit.py [section.field=value ...]
"""

from adaptune.recipe import main

if __name__ == "__main__":
    main("cls_bitfit", description=__doc__)  # the preset: adaptune/presets.py
