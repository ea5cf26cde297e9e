"""Summarization with LoRA on a decoder: smollm2-135m on XSum (the 1,000 validation documents
here, split 80/10/10), ROUGE-1/2/L.

    accelerate launch recipes/summarize_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

PRESET = {
    "model": {"name": "smollm2-135m", "max_length": 384},
    "data": {"task": "summarization", "dataset": "xsum", "max_dev_examples": 50},
    "method": {"name": "lora", "rank": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {"epochs": 1, "batch_size": 8, "lr": 5e-4, "eval_batch_size": 16},
    "generation": {"max_new_tokens": 40, "num_beams": 1},
    "output_dir": "runs/summarize_lora",
}

if __name__ == "__main__":
    main(PRESET, description=__doc__)
