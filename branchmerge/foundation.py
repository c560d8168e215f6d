"""Small pieces every stage shares, written once: content hashes, package versions, atomic writes,
dtype names and seed mixing.

    file_hash(path)                     # xxh3-128 hex of the bytes (cached by path, size, mtime)
    file_hash(path, "sha256")           # the same for sha256 (manifests other tools can check)
    with atomic_write(path) as tmp:     # write tmp; it replaces `path` only if the block succeeds
    with atomic_dir(folder) as tmp:     # the same for a folder
    write_json(path, obj)               # atomic JSON (or JSON lines with lines=True)
    DTYPES["bfloat16"]                  # config dtype name -> torch.dtype
    mix_seed(seed, offset)              # (seed * 1_000_003 + offset) mod 2**63: a derived RNG seed

This module sits at the bottom of the layer rule (docs/architecture.md): it imports no other
branchmerge module.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_HASH_CACHE: dict[tuple[str, str, int, int], str] = {}


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(algorithm)


def file_hash(path: str | os.PathLike, algorithm: str = "xxh3_128") -> str:
    """Hex digest of the file's bytes, read in 16 MiB blocks; cached by (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (algorithm, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = _hasher(algorithm)
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def versions(packages: tuple[str, ...] = ("branchmerge", "torch", "safetensors", "transformers")) -> dict:
    """Installed versions of `packages` (those not installed are left out)."""
    out = {}
    for pkg in packages:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield `<path>.tmp` to write; it is renamed onto `path` only if the block succeeds (a reader never
    sees a half-written file), and removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder at `<target>.tmp-<pid>` and rename it to `target` only if the block succeeds;
    an interrupted build never leaves anything at `target` (a stale .tmp is removed on the next try)."""
    target = Path(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_json(path: str | os.PathLike, obj: Any, lines: bool = False) -> None:
    """`obj` as indented JSON, or (lines=True) each item of `obj` as one JSON line, written atomically."""
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in obj)
        else:
            json.dump(obj, f, indent=2)


def mix_seed(seed: int, offset: int) -> int:
    """A seed derived from `seed` for one stream (`offset` names it): (seed·1 000 003 + offset) mod 2⁶³."""
    return (seed * 1_000_003 + offset) % (2**63)
