"""Summarization with LoRA on a decoder: smollm2-135m on XSum (the 1,000 validation documents
here, split 80/10/10), ROUGE-1/2/L.

    accelerate launch recipes/summarize_lora.py [section.field=value ...]
"""

from adaptune.recipe import main

if __name__ == "__main__":
    main("summarize_lora", description=__doc__)  # the preset: adaptune/presets.py
