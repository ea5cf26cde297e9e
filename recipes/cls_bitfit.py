"""Sentence classification with BitFit (biases + head only): minilm-l6 on SST-2.

    accelerate launch recipes/cls_bitfit.py [section.field=value ...]
"""

from adaptune.recipe import main
from cls_lora import PRESET as CLS_LORA  # the script folder is on sys.path

PRESET = {**CLS_LORA, "method": {"name": "bitfit"}, "train": {**CLS_LORA["train"], "lr": 2e-3},
          "output_dir": "runs/cls_bitfit"}

if __name__ == "__main__":
    main(PRESET, description=__doc__)
