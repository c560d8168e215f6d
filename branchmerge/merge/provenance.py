"""What a merged folder records about itself (`merge_provenance.json`): inputs with content hashes
(xxh3-128 of every weight file, cached by path, size and mtime), the recipe, seeds, versions."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from branchmerge.foundation import file_hash, versions
from branchmerge.utils.git import git_revision

# Bumped whenever a method's output changes for the same recipe and inputs, so that a folder merged by
# an older engine is merged again instead of reused. 2: Arcee Fusion takes one log of P/Q (not
# log P − log Q) and draws its subsamples block by block. 3: TIES keeps exactly
# k = max(1, floor(density·n)) entries, ties at the threshold broken by position; a zero sign sum elects +.
# 4: Breadcrumbs and SCE keep mergekit's exact counts (ties at a cut broken by position); SCE's
# variance and η, Breadcrumbs' rescale and the sums over models follow mergekit's compute-dtype
# arithmetic; fp32 inputs merged in bf16 subtract the rounded base.
ENGINE_VERSION = 4


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
