"""Domain adaptation: continue pretraining on in-domain text with an adapter, merge it into the
base, then fine-tune the task on top -- all through the same training flow as any other run.

    from adaptune.domain import adapt_and_finetune
    result = adapt_and_finetune("minilm-l6", corpus="bio", task="ner", dataset="bc5cdr",
                                output_dir="runs/bio")
    result.domain["perplexity_before"], result.domain["perplexity_after"], result.task["dev"]

Stage 1 (domain): masked LM for encoders, causal LM for decoders, on the cleaned, de-duplicated
corpus, with held-out perplexity before and after. The zoo encoders ship no masked-LM head, so
one is created (tied to the word embeddings); "before" is then that head fitted alone on the
domain text with the encoder frozen (same budget), since an untrained head has no meaningful
perplexity. For decoders "before" is the pretrained model as it is.
Stage 2 (task): the domain adapter is merged into the base weights, the merged model is saved
as an ordinary Hugging Face folder, and the task is trained on it like on any checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune.config import compose, merge_dicts
from adaptune.errors import ConfigError
from adaptune.presets import DOMAIN_STAGE, DOMAIN_TASK
from adaptune.safe_io import atomic_dir, write_json
from adaptune.spec import Family, resolve_model
from adaptune.train import RunResult, evaluate_untrained, run

DOMAIN_MODEL_DIR = "domain-model"


@dataclass
class DomainResult:
    output_dir: Path
    domain: dict[str, Any]  # perplexity before/after, corpus statistics, the stage's metrics
    task: dict[str, Any]  # the task run's metrics

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "task": self.task}


def domain_stage(model: str, corpus: str, output_dir: Path, *,
                 overrides: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Stage 1 (preset `adaptune.presets.DOMAIN_STAGE`, then `overrides`). Returns the merged
    model folder and the stage's report."""
    from adaptune import api
    from adaptune.tasks.lm import load_corpus

    given_files = Path(corpus).exists()
    lm = merge_dicts(merge_dicts(DOMAIN_STAGE, {
        "model": {"name": model},
        "data": {"task": "lm", "dataset": "" if given_files else corpus,
                 "train_path": corpus if given_files else ""}}), overrides or {})
    adapted_cfg = compose(lm, {"output_dir": str(output_dir / "domain-adapter")})
    _, stats, where = load_corpus(adapted_cfg.data)  # fails early on an empty corpus
    family = resolve_model(adapted_cfg.model.name).family
    if family is Family.ENCODER:
        print("domain stage: the encoder ships no masked-LM head; adaptune creates one tied to "
              "the word embeddings. 'Before' = that head fitted alone on the domain text.")
        before_run = run(compose(lm, {"method": {"name": "head", "targets": []},
                                      "output_dir": str(output_dir / "domain-head-only")}))
        before = before_run.metrics["dev"]
    else:
        before = evaluate_untrained(adapted_cfg)
    adapted = run(adapted_cfg)
    merged = api.load(adapted.adapter_dir, merge=True)
    folder = output_dir / DOMAIN_MODEL_DIR
    with atomic_dir(folder) as tmp:
        merged.model.backbone.save_pretrained(tmp, safe_serialization=True)
        merged.tokenizer.save_pretrained(tmp)
    report = {
        "corpus": where, "documents_read": stats.documents_read, "too_short": stats.too_short,
        "duplicates": stats.duplicates, "documents_kept": stats.kept,
        "train_documents": adapted.metrics["train_examples"],
        "heldout_documents": adapted.metrics["dev_examples"],
        "perplexity_before": before["perplexity"], "perplexity_after":
            adapted.metrics["dev"]["perplexity"], "heldout_tokens": before.get("tokens"),
        "before_is": "fitted MLM head, frozen encoder" if family is Family.ENCODER
        else "pretrained model, untouched",
        "steps": adapted.metrics["optimizer_steps"], "planned_steps":
            adapted.metrics["planned_steps"], "stopped_early": adapted.metrics["stopped_early"],
        "wall_time_s": adapted.metrics["wall_time_s"],
        "precision": adapted.metrics["precision"],
        "trainable_params": adapted.metrics["trainable_params"],
        "merged_model": str(folder),
    }
    return folder, report


TASK_CORPUS = "task"  # the corpus name that means "the task's own training text" (TAPT)


def task_corpus(task: str, dataset: str, out: Path,
                data_overrides: dict[str, Any] | None = None) -> Path:
    """The task's training text, labels stripped, as a JSON-lines corpus at out/tapt-corpus.jsonl:
    task-adaptive pretraining (Gururangan et al., 2020). Only the training split is read (after
    any selection split is carved out): dev and test text never enter pretraining."""
    from adaptune.tasks import build_task

    cfg = compose({"data": {"task": task, "dataset": dataset, **(data_overrides or {})}})
    task_ = build_task(cfg)
    examples = task_.load(cfg.data, "train", cfg.train.seed)
    path = out / "tapt-corpus.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": task_.corpus_text(ex)}) + "\n"
                           for ex in examples))
    tmp.replace(path)
    return path


def adapt(model: str, corpus: str, output_dir: str, *, task: str = "", dataset: str = "",
          overrides: dict[str, Any] | None = None,
          task_data: dict[str, Any] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The domain stage alone: continue pretraining `model` on `corpus` with an adapter and
    merge it. `corpus` is a named corpus, text/JSON-lines files, "task" (TAPT: the training
    text of `task`/`dataset`, labels stripped), or "<corpus>+task" (DAPT, then TAPT on the
    result). Returns the merged model folder (an ordinary Hugging Face folder) and one report
    per stage (held-out perplexity before and after, corpus statistics, steps, time)."""
    out = Path(output_dir)
    stages = corpus.split("+") if corpus != TASK_CORPUS else [TASK_CORPUS]
    reports, current = [], model
    for i, stage in enumerate(stages):
        if stage == TASK_CORPUS:
            if not task:
                raise ConfigError("adapt: corpus 'task' (TAPT) needs task= and dataset=")
            stage_corpus = str(task_corpus(task, dataset, out, task_data))
        else:
            stage_corpus = stage
        where = out if len(stages) == 1 else out / f"stage{i + 1}-{stage.replace('/', '_')}"
        folder, report = domain_stage(current, stage_corpus, where, overrides=overrides)
        report["stage"] = "TAPT" if stage == TASK_CORPUS else "DAPT"
        reports.append(report)
        current = str(folder)
    write_json(out / "domain.json", reports[-1] if len(reports) == 1 else
               {**reports[-1], "stages": reports})
    return Path(current), reports


CARRY = ("merge", "continue", "stack")


def adapt_and_finetune(model: str, corpus: str, task: str, dataset: str, *,
                       output_dir: str, domain_overrides: dict[str, Any] | None = None,
                       task_overrides: dict[str, Any] | None = None,
                       domain_model: str | Path | None = None,
                       carry: str = "merge") -> DomainResult:
    """Both stages from a model name, a corpus (a named corpus, files, "task" for TAPT or
    "<corpus>+task" for DAPT then TAPT), a task and its data. `domain_model` reuses a merged
    model from an earlier stage 1 (e.g. across seeds). `carry`: how the domain knowledge goes
    into the task: "merge" (the domain adapter folded into the base, the task trains a new
    adapter on it), "continue" (the task trains the domain adapter further, on the original
    base: it must have the task's targets and rank) or "stack" (the domain adapter kept frozen
    under a new task adapter; the saved task adapter carries it and loads with it)."""
    if carry not in CARRY:
        raise ConfigError(f"adapt_and_finetune: carry={carry!r} is not one of {', '.join(CARRY)}")
    if carry != "merge" and "+" in corpus:
        raise ConfigError(f"adapt_and_finetune: carry={carry!r} takes one domain stage; with "
                          f"{corpus!r} the last adapter was trained on the first stage's merged "
                          "model, not on the base: use carry='merge'")
    out = Path(output_dir)
    if domain_model is None:
        task_data = (task_overrides or {}).get("data")
        folder, reports = adapt(model, corpus, str(out), task=task, dataset=dataset,
                                overrides=domain_overrides, task_data=task_data)
        report = json.loads((out / "domain.json").read_text())
    else:
        folder = Path(domain_model)
        report = json.loads((folder.parent / "domain.json").read_text())
    domain_adapter = str(folder.parent / "domain-adapter" / "adapter")
    carried = {"merge": {"model": {"name": str(folder)}},
               "continue": {"model": {"name": model},
                            "method": {"lora": {"init_from": domain_adapter}}},
               "stack": {"model": {"name": model},
                         "method": {"lora": {"stack_on": domain_adapter}}}}[carry]
    task_cfg = compose(DOMAIN_TASK, carried, {"data": {"task": task, "dataset": dataset},
                                              "output_dir": str(out / "task")}, task_overrides)
    task_result: RunResult = run(task_cfg)
    result = DomainResult(out, report, task_result.metrics)
    write_json(out / "result.json", result.to_json())
    return result
