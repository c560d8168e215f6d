"""What a merged folder records about itself (`merge_provenance.json`): inputs with content hashes
(xxh3-128 of every weight file, cached by path, size and mtime), the recipe, seeds, versions."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import platform
from pathlib import Path
from typing import Any

import xxhash

from branchmerge.utils.git import git_revision

_CACHE: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        h = xxhash.xxh3_128()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("branchmerge", "torch", "safetensors", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# Bumped whenever a method's output changes for the same recipe and inputs, so that a folder merged by
# an older engine is merged again instead of reused. 2: Arcee Fusion takes one log of P/Q (not
# log P − log Q) and draws its subsamples block by block.
ENGINE_VERSION = 2


def provenance(ckpts: dict[str, Any], recipe: dict, hash_inputs: bool = True) -> dict:
    inputs = {}
    for name, ck in ckpts.items():
        files = ck.files()
        inputs[name] = {
            "path": str(ck.path.resolve()),
            "files": {f.name: (file_hash(f) if hash_inputs else None) for f in files},
            "hash": "xxh3_128" if hash_inputs else None,
        }
        meta = ck.path / "branchmerge.json"
        if meta.exists():
            inputs[name]["trained_by"] = {
                k: v
                for k, v in json.loads(meta.read_text()).items()
                if k in ("git_revision", "final_loss", "steps", "hydra_overrides")
            }
    return {
        "inputs": inputs,
        "recipe": recipe,
        "engine_version": ENGINE_VERSION,
        "versions": versions(),
        "git_revision": git_revision(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
