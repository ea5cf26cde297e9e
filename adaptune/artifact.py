"""The adapter folder: the one place that writes and reads it.

    adapter/
      adapter_config.json, adapter_model.safetensors   peft methods (head in modules_to_save)
      trainable.safetensors                            bitfit / full / head
      adaptune.json                                    how to rebuild the model around them

`adaptune.json` names the base model (as given and as resolved), its family, the task, the label
set, the method, the maximum length, the run's resolved config and the SHA-256 of every weights
file. Training writes the folder atomically (a temporary folder renamed into place); loading
checks the checksums before reading a tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from adaptune.config import RunConfig, from_dict, to_dict, upgrade_stored
from adaptune.errors import ConfigError, ModelError, OutputDirError
from adaptune.modeling import TaskModel, build_task_model, load_tokenizer
from adaptune.safe_io import (atomic_dir, recover_interrupted_swap, sha256_of,
                              verify_checksums, write_json)
from adaptune.spec import Family, ResolvedRun, resolve

ADAPTER_DIR = "adapter"
META_FILE = "adaptune.json"


@dataclass(frozen=True)
class AdapterMeta:
    """What `adaptune.json` says."""

    model: str  # the name the run was given (zoo name, Hub id or folder)
    model_path: str  # what it resolved to when trained
    family: Family
    task: str
    labels: list[str]
    method: str
    max_length: int
    config: RunConfig
    sha256: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "model_path": self.model_path, "family": self.family.value,
                "task": self.task, "labels": self.labels, "method": self.method,
                "max_length": self.max_length, "config": to_dict(self.config),
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> "AdapterMeta":
        try:
            return cls(data["model"], data["model_path"], Family(data["family"]), data["task"],
                       list(data["labels"]), data["method"], int(data["max_length"]),
                       from_dict(upgrade_stored(data["config"])), dict(data.get("sha256", {})))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{where}: not a valid {META_FILE} ({exc!r})") from None


def write_adapter(model: nn.Module, run: ResolvedRun, labels: list[str], folder: Path) -> None:
    """The trained state (the method decides what that is) plus `adaptune.json`, atomically:
    the previous folder, if any, stays as it was when writing fails."""
    try:
        with atomic_dir(folder) as tmp:
            run.method.save(model, tmp)
            _name_the_base(tmp, run)
            weights = {f.relative_to(tmp).as_posix(): sha256_of(f)
                       for f in sorted(tmp.rglob("*.safetensors"))}  # stacked/ too
            if not weights or any((tmp / name).stat().st_size < 64 for name in weights):
                # peft under DeepSpeed ZeRO-3 is known to write empty adapters (peft #286, #2892).
                raise RuntimeError(f"saving the adapter produced no weights in {folder}")
            meta = AdapterMeta(run.config.model.name, run.model.path, run.model.family,
                               run.task.name, labels, run.method.name,
                               run.config.model.max_length, run.config, weights)
            write_json(tmp / META_FILE, meta.to_json())
    except OSError as exc:
        raise OutputDirError(f"could not write the adapter to {folder}: {exc.strerror or exc}; "
                             "the previously saved adapter, if any, is unchanged") from None


def _name_the_base(folder: Path, run: ResolvedRun) -> None:
    """peft writes `base_model_name_or_path: null` for our task model (it has no HF config):
    name the base (a zoo model by its prepared folder, else the Hub id or folder it was given),
    so peft's own tools and users reading the folder know what it adapts."""
    config_file = folder / "adapter_config.json"
    if config_file.exists():
        data = json.loads(config_file.read_text())
        data["base_model_name_or_path"] = run.model.path
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_meta(folder: Path, *, trusted: bool = False) -> AdapterMeta:
    """The folder's `adaptune.json`, with every weights file checked against its checksum. A
    folder without checksums is refused unless the caller says it trusts it, and a folder with
    pickle files (`adapter_model.bin`, ...) is refused always: only safetensors load."""
    folder = Path(folder)
    recover_interrupted_swap(folder)
    path = folder / META_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: not an adaptune adapter folder (no {META_FILE})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    meta = AdapterMeta.from_json(data, path)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{folder}: holds pickle files ({', '.join(pickles)}); adaptune loads "
                         "safetensors only (a pickle can run code when loaded). Remove them.")
    if not meta.sha256 and not trusted:
        raise ModelError(f"{path}: records no checksums, so the weights cannot be verified; "
                         "load it with trusted=True (adaptune predict --trusted) only if you "
                         "know where the folder came from")
    verify_checksums(folder, meta.sha256)
    return meta


def resolved_run(meta: AdapterMeta) -> ResolvedRun:
    """The run the adapter came from, resolved again here. A zoo model is looked up by name
    (the cache may live elsewhere on this machine); anything else loads from the path it was
    trained from."""
    from adaptune import zoo

    name = meta.model if meta.model in zoo.ZOO else meta.model_path
    return resolve(meta.config.replace(model={"name": name}))


def build_base(meta_or_folder: AdapterMeta | str | Path) -> TaskModel:
    """The un-adapted task model (pretrained backbone + freshly initialised head) that an adapter
    was trained on: hand it to `peft.PeftModel.from_pretrained(base, folder)`."""
    meta = meta_or_folder if isinstance(meta_or_folder, AdapterMeta) else \
        read_meta(Path(meta_or_folder))
    run = resolved_run(meta)
    return _base(run, meta)


def _base(run: ResolvedRun, meta: AdapterMeta) -> TaskModel:
    tokenizer = load_tokenizer(run.model.path)
    return build_task_model(run, meta.labels, tokenizer.pad_token_id)


# How `load(..., merge=True)` treats a 4/8-bit base. Folding an adapter into quantized weights
# rounds it away or corrupts them silently (peft #2321), so the default refuses; the other two
# first de-quantize the base (the weights the adapter was trained against, to the quantizer's
# rounding), fold the adapter in, and either keep full precision or quantize the result again.
QUANTIZED_MERGES = ("refuse", "dequantize", "requantize")
# The error a quantized merge adds is measured on this many seeded random-token sequences.
MERGE_PROBE_SEQUENCES, MERGE_PROBE_LENGTH = 16, 32


class LoadedAdapter(NamedTuple):
    model: nn.Module
    tokenizer: Any
    meta: AdapterMeta
    run: ResolvedRun
    merge_report: dict[str, Any] | None  # the error a quantized merge added (None otherwise)


def load_adapter(folder: Path, *, merge: bool = False, quantized_merge: str = "refuse",
                 trusted: bool = False) -> LoadedAdapter:
    """The base rebuilt, the trained state (head included) put back on it, optionally merged
    into the weights. On a quantized base, `merge` needs `quantized_merge` = "dequantize" or
    "requantize" (see QUANTIZED_MERGES), and the result carries the error the merge added."""
    if quantized_merge not in QUANTIZED_MERGES:
        raise ConfigError(f"quantized_merge={quantized_merge!r}: expected one of "
                          f"{', '.join(QUANTIZED_MERGES)}")
    meta = read_meta(folder, trusted=trusted)
    quantization = meta.config.model.quantization
    if merge and quantization != "none" and quantized_merge == "refuse":
        raise ModelError(f"{folder}: the base is loaded in {quantization} "
                         "(model.quantization); merging the adapter into quantized weights "
                         "is refused (it can round the adapter away, peft #2321): predict "
                         "without merge (the adapter stays beside the base), or ask for "
                         "quantized_merge='dequantize' (a full-precision merged model) or "
                         "'requantize' (merged, then quantized again); both report the error "
                         "they add")
    run = resolved_run(meta)
    model = run.method.load(_base(run, meta), Path(folder))
    report = None
    if merge and quantization != "none":
        model, report = _merge_quantized(model, run, meta, Path(folder), quantized_merge)
    elif merge:
        model = run.method.merge(model)
    return LoadedAdapter(model, load_tokenizer(run.model.path), meta, run, report)


def _merge_quantized(adapted: nn.Module, run: ResolvedRun, meta: AdapterMeta, folder: Path,
                     how: str) -> tuple[nn.Module, dict[str, Any]]:
    """`adapted` (the quantized base with the adapter beside it) merged as `how` says, and the
    error that adds: the merged model's outputs against `adapted`'s on seeded random tokens."""
    probe = _merge_probe(adapted)
    reference = _probe_outputs(adapted, probe)
    if how == "requantize":
        # peft de-quantizes each bitsandbytes layer, adds the adapter's delta and quantizes the
        # sum again; the rounding of that last step is the error measured below.
        merged = run.method.merge(adapted)
    else:
        del adapted
        quantized = _base(run, meta)
        base = TaskModel(quantized.backbone.dequantize(), quantized.task_head)
        merged = run.method.merge(run.method.load(base, folder))
    outputs = _probe_outputs(merged, probe)
    delta = (outputs - reference).abs()
    report = {"quantization": meta.config.model.quantization, "quantized_merge": how,
              "probe": f"{MERGE_PROBE_SEQUENCES} seeded random-token sequences of "
                       f"{MERGE_PROBE_LENGTH} tokens",
              "mean_abs_output_change": float(delta.mean()),
              "max_abs_output_change": float(delta.max()),
              "reference_mean_abs_output": float(reference.abs().mean()),
              "argmax_agreement": float((outputs.argmax(-1) == reference.argmax(-1))
                                        .float().mean())}
    return merged, report


def _merge_probe(model: nn.Module) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (MERGE_PROBE_SEQUENCES, MERGE_PROBE_LENGTH),
                        generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _probe_outputs(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's outputs (logits; the first tensor of a tuple) on the probe, in fp32 on CPU."""
    device = next(model.parameters()).device
    model.eval()
    logits = model(**{k: v.to(device) for k, v in probe.items()}).logits
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.float().cpu()
