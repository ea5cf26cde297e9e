"""Several adapters trained on one base: merged into one (`merge_adapters`), or served together
on one base with a batch that mixes them (`MultiAdapterPredictor`).

Merging goes through peft's `add_weighted_adapter` (LoRA and DoRA adapters):

    linear   A = sum sqrt(w_i * s_i) A_i, B = sum sqrt(w_i) B_i (equal ranks; peft's definition:
             the factors are averaged, so the update is NOT the weighted sum of the updates)
    cat      A and B stacked: the update is exactly sum w_i * s_i * B_i A_i (rank = sum of ranks)
    ties, dare_linear, dare_ties   sparsified factors (Yadav et al. 2023; Yu et al. 2024), with
             `density` the share of entries kept

Task heads are not merged: each adapter carries its own trained head, and averaging two heads
trained on different features means nothing. `head=i` keeps adapter i's head (and its labels);
without it, adapters whose heads differ are refused.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from adaptune.artifact import (AdapterMeta, _base, load_adapter, read_meta, resolved_run,
                               write_adapter)
from adaptune.errors import ConfigError
from adaptune.methods import HEAD, build_method

COMBINATIONS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
MERGEABLE_METHODS = ("lora", "dora")


def merge_adapters(adapter_dirs: Sequence[str | Path], out: str | Path, *,
                   combination: str = "cat", weights: Sequence[float] | None = None,
                   density: float = 0.5, head: int | None = None) -> Path:
    """Combine adapters trained on one base into one adapter folder at `out` (it loads with
    `adaptune.load` and with plain peft). Returns `out`."""
    folders = [Path(d) for d in adapter_dirs]
    if len(folders) < 2:
        raise ConfigError("merge: give at least two adapter folders")
    if combination not in COMBINATIONS:
        raise ConfigError(f"merge: combination {combination!r} is not one of "
                          f"{', '.join(COMBINATIONS)}")
    weights = list(weights) if weights is not None else [1.0 / len(folders)] * len(folders)
    if len(weights) != len(folders):
        raise ConfigError(f"merge: {len(weights)} weights for {len(folders)} adapters")
    if not 0 < density <= 1:
        raise ConfigError(f"merge: density must be in (0, 1], got {density}")
    metas = [read_meta(f) for f in folders]
    _check_compatible(folders, metas, combination)
    heads = [_head_state(f) for f in folders]
    if head is None and any(not _same(heads[0], h) for h in heads[1:]):
        raise ConfigError(
            "merge: the adapters have different task heads (each trained its own); a merged "
            "adapter keeps one of them: pass head=<index> (the CLI's --head), e.g. head=0 for "
            f"{folders[0]} (labels {metas[0].labels})")
    keep = head or 0
    if not 0 <= keep < len(folders):
        raise ConfigError(f"merge: head={keep} is not an index of the {len(folders)} adapters")

    from peft import PeftModel

    run = resolved_run(metas[keep])
    names = [f"a{i}" for i in range(len(folders))]
    with tempfile.TemporaryDirectory(prefix="adaptune-merge-") as tmp:
        # peft refuses add_weighted_adapter while the adapters have modules_to_save (the
        # head): merge head-less copies, then give the result the kept head.
        bare = [_without_head(f, Path(tmp) / name) for f, name in zip(folders, names)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(_base(run, metas[keep]), str(bare[0]),
                                              adapter_name=names[0])
            for name, folder in zip(names[1:], bare[1:]):
                model.load_adapter(str(folder), adapter_name=name)
            model.add_weighted_adapter(names, weights, "merged", combination_type=combination,
                                       density=None if combination in ("linear", "cat")
                                       else density)
        model.save_pretrained(tmp, selected_adapters=["merged"], safe_serialization=True)
        merged_config = model.peft_config["merged"]
        composed = _with_head(Path(tmp) / "merged", folders[keep])
        # Reloaded as the "default" adapter of a fresh base: the folder then has the layout of
        # any trained adapter (what adaptune.load and plain peft expect).
        fresh = PeftModel.from_pretrained(_base(run, metas[keep]), str(composed))
    # The merged adapter's own budget, as peft set it (cat: the ranks add up; the weights and
    # scalings are folded into the factors, so alpha = r).
    config = run.config.replace(method={
        "rank": merged_config.r, "alpha": float(merged_config.lora_alpha),
        "scaling": "rslora" if merged_config.use_rslora else "alpha/r"})
    merged_run = dataclasses.replace(run, config=config, method=build_method(config.method))
    write_adapter(fresh, merged_run, metas[keep].labels, Path(out))
    _record_provenance(Path(out), folders, combination, weights, density, keep)
    return Path(out)


def _check_compatible(folders: list[Path], metas: list[AdapterMeta], combination: str) -> None:
    first = metas[0]
    for folder, meta in zip(folders, metas):
        if meta.method not in MERGEABLE_METHODS:
            raise ConfigError(f"merge: {folder} is a {meta.method} adapter; merging combines "
                              f"{' and '.join(MERGEABLE_METHODS)} adapters (peft's "
                              "add_weighted_adapter)")
        if (meta.model, meta.config.model.quantization) != \
                (first.model, first.config.model.quantization):
            raise ConfigError(f"merge: {folder} was trained on {meta.model} "
                              f"({meta.config.model.quantization}), {folders[0]} on "
                              f"{first.model} ({first.config.model.quantization}); adapters "
                              "merge only on one base")
        if meta.task != first.task:
            raise ConfigError(f"merge: {folder} is a {meta.task} adapter, {folders[0]} a "
                              f"{first.task} one")
    ranks = {m.config.method.rank for m in metas}
    if combination == "linear" and len(ranks) > 1:
        raise ConfigError(f"merge: linear needs equal ranks, these have {sorted(ranks)}; use "
                          "cat (exact, ranks add up) or ties/dare_*")


def _without_head(folder: Path, out: Path) -> Path:
    """A copy of an adapter folder with its LoRA tensors only (no modules_to_save)."""
    import json

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (out / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if f".{HEAD}." not in f".{k}"},
              str(out / "adapter_model.safetensors"))
    return out


def _with_head(merged: Path, head_of: Path) -> Path:
    """The merged (head-less) adapter with the head of `head_of` added back."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((merged / "adapter_config.json").read_text())
    config["modules_to_save"] = [HEAD]
    (merged / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(str(merged / "adapter_model.safetensors"))
    save_file({**state, **_head_state(head_of)}, str(merged / "adapter_model.safetensors"))
    return merged


def _head_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if f".{HEAD}." in f".{k}"}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _record_provenance(out: Path, folders: list[Path], combination: str,
                       weights: list[float], density: float, head: int) -> None:
    from adaptune.safe_io import write_json

    write_json(out / "merge.json", {"adapters": [str(f) for f in folders],
                                    "combination": combination, "weights": weights,
                                    "density": density, "head_of": str(folders[head])})


class MultiAdapterPredictor:
    """N adapters on one base, loaded once; `predict(inputs, adapters)` takes one adapter name
    per input. Each input is run through its own adapter (and head), so the result equals each
    adapter's own prediction; every input is processed once, grouped by adapter.

    peft's own mixed-batch forward (`adapter_names=`) refuses modules_to_save modules that are
    not a single layer, which a task head is; grouping needs no such check."""

    def __init__(self, adapters: dict[str, str | Path]) -> None:
        from peft import PeftModel

        if not adapters:
            raise ConfigError("MultiAdapterPredictor: give at least one adapter")
        items = list(adapters.items())
        first_name, first_dir = items[0]
        model, tokenizer, meta, run, _ = load_adapter(Path(first_dir))
        if not isinstance(model, PeftModel):
            raise ConfigError(f"MultiAdapterPredictor: {first_dir} is a {meta.method} run; "
                              "several adapters share a base only with peft methods")
        self.metas = {first_name: meta}
        self._peft_names = {first_name: "default"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            for name, folder in items[1:]:
                other = read_meta(Path(folder))
                if other.model != meta.model or other.task != meta.task:
                    raise ConfigError(f"MultiAdapterPredictor: {folder} is a {other.task} "
                                      f"adapter of {other.model}; {first_dir} is a {meta.task} "
                                      f"adapter of {meta.model}: one base, one task")
                model.load_adapter(str(folder), adapter_name=name)
                self.metas[name] = other
                self._peft_names[name] = name
        self.model, self.tokenizer, self.task = model.eval(), tokenizer, run.task

    @property
    def names(self) -> list[str]:
        return list(self.metas)

    def predict(self, inputs: Sequence[Any], adapters: Sequence[str] | str,
                batch_size: int = 64) -> list[Any]:
        from adaptune.inference import predict_features

        names = [adapters] * len(inputs) if isinstance(adapters, str) else list(adapters)
        if len(names) != len(inputs):
            raise ConfigError(f"predict: {len(names)} adapter names for {len(inputs)} inputs")
        unknown = sorted(set(names) - set(self.metas))
        if unknown:
            raise ConfigError(f"predict: unknown adapter(s) {unknown}; loaded: {self.names}")
        out: list[Any] = [None] * len(inputs)
        for name in dict.fromkeys(names):
            positions = [i for i, n in enumerate(names) if n == name]
            meta = self.metas[name]
            examples = self.task.make_examples([inputs[i] for i in positions])
            features = self.task.encode(list(examples), self.tokenizer, meta.labels,
                                        meta.max_length, "predict")
            self.model.set_adapter(self._peft_names[name])
            predictions = predict_features(self.model, self.task, features, self.tokenizer,
                                           batch_size)
            for i, value in zip(positions, self.task.decode(examples, features, predictions,
                                                            meta.labels)):
                out[i] = value
        return out
