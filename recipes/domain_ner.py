"""Domain-adaptive pretraining, then NER: minilm-l6 continues masked-LM pretraining with LoRA on
biomedical text (PubMed abstracts + BC5CDR/NCBI training sentences), the adapter is merged, then
BC5CDR NER is fine-tuned with LoRA on the adapted model.

    python recipes/domain_ner.py [--corpus bio] [--dataset bc5cdr] [task overrides ...]
"""

import argparse

from adaptune.config import parse_overrides
from adaptune.domain import adapt_and_finetune

TASK = {"model": {"max_length": 128},
        "method": {"name": "lora", "rank": 8, "targets": ["query", "key", "value", "dense"]},
        "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3}}
DOMAIN = {"train": {"epochs": 1, "batch_size": 32, "lr": 1e-3}}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--corpus", default="bio", help="a named corpus or text/JSONL files")
    parser.add_argument("--dataset", default="bc5cdr")
    parser.add_argument("--output-dir", default="runs/domain_ner")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides for the task stage")
    args = parser.parse_args()
    from adaptune.config import _merge

    result = adapt_and_finetune(args.model, args.corpus, task="ner", dataset=args.dataset,
                                output_dir=args.output_dir, domain_overrides=DOMAIN,
                                task_overrides=_merge(TASK, parse_overrides(args.overrides)))
    d = result.domain
    print(f"domain: {d['documents_kept']} documents ({d['duplicates']} duplicates removed); "
          f"held-out perplexity {d['perplexity_before']:.2f} -> {d['perplexity_after']:.2f}")
    print(f"task: {args.dataset} dev F1 {result.task['dev']['f1']:.4f}")
    print(f"outputs: {args.output_dir}/ (domain.json, domain-model/, task/, result.json)")
