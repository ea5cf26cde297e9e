"""Files written atomically and read safely.

Writes go to a temporary sibling that is renamed into place only when complete, so a crash (or
SIGKILL) never leaves a file or folder that looks finished but is not. Reads use safetensors and
JSON only: nothing here unpickles data from a file a user may have downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from adaptune.errors import ModelError


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`: the old folder
    is renamed aside, the new one renamed in, the old one deleted. A kill between the two
    renames leaves the old folder under .old-<name>-<pid>, which `recover_interrupted_swap`
    (called before a run folder or adapter is used) puts back."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted_swap(folder: Path) -> None:
    """A kill between the two renames of an adapter swap (old aside, new in) leaves the old
    adapter under .old-<name>-*: put it back. Half-written .tmp-<name>-* folders are removed."""
    parent = folder.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".old-{folder.name}-*"))
    if not folder.exists() and olds:
        os.replace(olds[-1], folder)
        olds = olds[:-1]
    for leftover in olds + sorted(parent.glob(f".tmp-{folder.name}-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_safetensors(path: Path) -> dict[str, Any]:
    """Load a safetensors file, turning a truncated or tampered file into a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a valid safetensors file (truncated or modified?): "
                         f"{exc}") from None


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path, expected: dict[str, str]) -> None:
    """Refuse a folder whose files differ from the checksums recorded when it was saved."""
    for name, digest in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            raise ModelError(f"{path}: file missing from the adapter folder")
        load_safetensors(path)  # a clear message for a truncated or malformed file
        if sha256_of(path) != digest:
            raise ModelError(f"{path}: checksum differs from the one recorded at save time; "
                             "the file was modified or corrupted after saving")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
