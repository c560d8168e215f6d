"""Writing Hugging Face checkpoint folders: sharded safetensors with an index, written atomically.

    write_sharded(tensors, out_dir, max_shard_bytes)   # model-00001-of-00003.safetensors + index json

Used by the training export and the merge engine, so every checkpoint branchmerge writes is a plain
HF folder that `from_pretrained` and vLLM load.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write (name, tensor) pairs into shards of at most `max_shard_bytes` (a tensor larger than that
    gets a shard of its own). One shard is `model.safetensors`; several get an index. Returns file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.detach().to("cpu").contiguous()
        sizes[-1] += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    return names


@contextmanager
def atomic_dir(target: str | Path):
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
