"""Domain-adaptive pretraining, then NER: minilm-l6 continues masked-LM pretraining with LoRA on
biomedical text (PubMed abstracts + BC5CDR/NCBI training sentences), the adapter is merged, then
BC5CDR NER is fine-tuned with LoRA on the adapted model.

    python recipes/domain_ner.py [--corpus bio] [--dataset bc5cdr] [task overrides ...]
"""

import argparse

from adaptune.config import merge_dicts, parse_overrides
from adaptune.domain import adapt_and_finetune
from adaptune.recipe import release_process_group

# Over adaptune.presets.DOMAIN_STAGE / DOMAIN_TASK: the task stage trains two epochs.
TASK = {"train": {"epochs": 2}}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--corpus", default="bio", help="a named corpus or text/JSONL files")
    parser.add_argument("--dataset", default="bc5cdr")
    parser.add_argument("--output-dir", default="runs/domain_ner")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides for the task stage")
    args = parser.parse_args()
    try:
        result = adapt_and_finetune(args.model, args.corpus, task="ner", dataset=args.dataset,
                                    output_dir=args.output_dir,
                                    task_overrides=merge_dicts(TASK,
                                                               parse_overrides(args.overrides)))
    finally:
        release_process_group()
    d = result.domain
    print(f"domain: {d['documents_kept']} documents ({d['duplicates']} duplicates removed); "
          f"held-out perplexity {d['perplexity_before']:.2f} -> {d['perplexity_after']:.2f}")
    print(f"task: {args.dataset} dev F1 {result.task['dev']['f1']:.4f}")
    print(f"outputs: {args.output_dir}/ (domain.json, domain-model/, task/, result.json)")
