"""Writing Hugging Face checkpoint folders: sharded safetensors with an index, written atomically.

    w = ShardWriter(out_dir, plan, max_shard_bytes)     # plan: [(name, shape, dtype)] in write order
    w.write(name, tensor_or_its_next_rows); w.close()   # model-00001-of-00003.safetensors + index json

Every shard's header is laid out up front from the plan, so tensor bytes go straight to disk and the
writer holds no tensor: the training export, Fisher importance and the merge engine all stream
through it, and every checkpoint branchmerge writes is a plain HF folder that `from_pretrained` and
vLLM load.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from branchmerge.errors import MissingFileError
from branchmerge.foundation import atomic_dir  # noqa: F401 (re-exported)

INDEX = "model.safetensors.index.json"
DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


def tensor_files(folder: str | Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, from the index (or the single file)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise MissingFileError(f"{folder} has neither {INDEX} nor model.safetensors")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


class ShardWriter:
    """Write planned tensors into shards of at most `max_shard_bytes`, streaming their bytes."""

    def __init__(
        self,
        out_dir: str | Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 * 1024**3,
        metadata: dict[str, str] | None = None,
        stem: str = "model",
    ) -> None:
        """`stem` names the files: `<stem>.safetensors`, or `<stem>-0000i-of-0000n.safetensors` and
        `<stem>.safetensors.index.json` when the plan needs several shards."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = math.prod(item[1]) * item[2].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        self.files = (
            [f"{stem}.safetensors"]
            if len(shards) == 1
            else [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        )
        self.index = INDEX.replace("model", stem, 1)
        self.shards = shards
        self.order = [(fi, name) for fi, shard in enumerate(shards) for name, _, _ in shard]
        self.expected = {name: (shape, dtype) for name, shape, dtype in plan}
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pos = 0  # index into self.order of the tensor being written
        self.written = 0  # bytes of the current tensor written so far
        self.fh = None
        self.current_file = -1

    def _open(self, fi: int) -> None:
        if self.fh is not None:
            self.fh.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        off = 0
        for name, shape, dtype in self.shards[fi]:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = (self.out / self.files[fi]).open("wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.current_file = fi

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append `data` (the whole tensor, or its next rows) for the tensor expected next."""
        fi, expected = self.order[self.pos]
        if name != expected:
            raise RuntimeError(f"writer expected tensor '{expected}' next, got '{name}'")
        shape, dtype = self.expected[name]
        if data.dtype != dtype:
            raise RuntimeError(f"'{name}': got dtype {data.dtype}, planned {dtype}")
        if fi != self.current_file:
            self._open(fi)
        buf = data.detach().contiguous().cpu()
        raw = buf.view(torch.uint8) if buf.dtype != torch.bool else buf.to(torch.uint8)
        self.fh.write(raw.reshape(-1).numpy())
        self.written += raw.numel()
        total = math.prod(shape) * dtype.itemsize
        if self.written > total:
            raise RuntimeError(f"'{name}': wrote {self.written} bytes, planned {total}")
        if self.written == total:
            self.pos += 1
            self.written = 0

    def close(self) -> list[str]:
        if self.pos != len(self.order):
            raise RuntimeError(f"writer closed after {self.pos} of {len(self.order)} tensors")
        if self.fh is not None:
            self.fh.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[fi] for fi, name in self.order}
            total = sum(math.prod(s) * d.itemsize for s, d in self.expected.values())
            (self.out / self.index).write_text(
                json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                    indent=2,
                )
            )
        return self.files
