"""The streaming merge executor: validate everything, then one pass over tensor names.

For each tensor name (in the first input's file order) the recipe's steps are evaluated for that
tensor only: inputs are memory-mapped (one tensor at a time), checked finite, merged, and the
result's bytes are appended to the output shard. Reading the next tensor, merging (and casting and
checking) this one and writing the previous one overlap (threads with one intra-op thread each); tensors of up
to 16 M entries merge two at a time (one per core), larger ones one at a time across the cores.
Methods that declare `casts_inputs` (linear, TIES/DARE, Arcee Fusion) get the stored-dtype (bf16)
tensors and cast cache-sized blocks themselves on a block-parallel pool (`methods.blocks`); the others
get whole tensors in the compute dtype. Finiteness: max(bits & exponent mask) < mask over the inputs,
or, when every step declares `nonfinite_propagates` (a NaN/Inf input entry always gives a NaN/Inf
output entry), over the output only, re-reading the inputs to name the one at fault.
Chains of row-separable methods (linear, task arithmetic, Fisher) run in blocks of rows, so even
the embedding never has to be held whole. Intermediate steps live only in memory unless `save`.
The output folder is built beside the target and renamed at the end (`foundation.atomic_dir`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from branchmerge.config.schema import MergeOptionsConfig
from branchmerge.foundation import atomic_dir
from branchmerge.merge.io import BY_NAME, Checkpoint, CheckpointError, ShardWriter
from branchmerge.merge.methods import blocks
from branchmerge.merge.provenance import provenance
from branchmerge.merge.recipe import Step, step_params

log = logging.getLogger(__name__)
SMALL_ITEM = 1 << 24  # entries: items up to this size merge whole, several at a time (one per thread)
SKIP_COPY = {".safetensors", ".bin", ".pt", ".pth"}
SKIP_NAMES = {
    "model.safetensors.index.json",
    "branchmerge.json",
    "merge_provenance.json",
    "fisher.safetensors",
}
ARCH_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


# The engine's options are the config group's schema itself (conf/merge.yaml `options:`), so the two
# can never disagree on a default.
MergeOptions = MergeOptionsConfig


def validate_inputs(ckpts: dict[str, Checkpoint]) -> list[str]:
    """Same architecture, tensor names, shapes, vocabulary and embedding tying; returns the names."""
    problems: list[str] = []
    ref_name, ref = next(iter(ckpts.items()))
    for _name, ck in ckpts.items():
        for key in ARCH_KEYS:
            a, b = ref.config.get(key), ck.config.get(key)
            if key == "tie_word_embeddings":
                a, b = bool(a), bool(b)
            if a != b:
                what = "tied vs untied embeddings" if key == "tie_word_embeddings" else key
                problems.append(f"{ck.path}/config.json: {what} differs from {ref_name} ({b!r} vs {a!r})")
        missing = sorted(set(ref.info) - set(ck.info))
        extra = sorted(set(ck.info) - set(ref.info))
        if missing:
            problems.append(
                f"{ck.path}: tensor '{missing[0]}' (of {ref_name}) is missing"
                + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if extra:
            problems.append(
                f"{ck.path}: tensor '{extra[0]}' is not in {ref_name}"
                + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for t in sorted(set(ref.info) & set(ck.info)):
            if ref.info[t].shape != ck.info[t].shape:
                hint = (
                    " (vocabularies differ: keep the padded Qwen vocabulary in every branch)"
                    if ("embed" in t or "lm_head" in t)
                    else ""
                )
                problems.append(
                    f"{ck.info[t].file}: tensor '{t}' has shape {list(ck.info[t].shape)}, "
                    f"{ref_name} has {list(ref.info[t].shape)}{hint}"
                )
    if problems:
        raise CheckpointError("inputs cannot be merged:\n" + "\n".join(f"  - {p}" for p in problems))
    return ref.names


def _importance_file(model_dir: Path) -> Path:
    for cand in (model_dir / "fisher.safetensors", model_dir.parent / "fisher.safetensors"):
        if cand.exists():
            return cand
    raise CheckpointError(
        f"no Fisher importance for {model_dir}: train it with fisher.enabled=true (writes "
        f"{model_dir.parent / 'fisher.safetensors'}) or estimate one with "
        "`python -m branchmerge.merge.importance`"
    )


class _Importance:
    """A fisher.safetensors file read like a checkpoint (tensor names as the model's)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        from branchmerge.merge.io import read_header

        self.path = path
        self.names = set(read_header(path)["tensors"])
        missing = [n for n in names if n not in self.names and not n.endswith("lm_head.weight")]
        if missing:
            raise CheckpointError(f"{path}: no importance for tensor '{missing[0]}'")

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = name if name in self.names else "model.embed_tokens.weight"  # tied lm_head
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(key)


def _reuse_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the OS: the
    engine allocates same-sized buffers tensor after tensor, and a fresh mapping costs a page fault
    per 4 KB on first touch (a 545 MB fp32 copy took 255 ms fresh vs 32 ms into reused memory)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest glibc allows
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# exponent bits of IEEE formats: a value is NaN or Inf iff they are all set
_EXPONENT = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}


def all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """No NaN/Inf in t: max(bits & exponent_mask) < exponent_mask over cache-sized blocks (one integer
    pass at memory speed; 20x cheaper than a float64 sum of bf16 on CPU). This is also the read: it
    touches every page of the memory-mapped tensor in the reader thread."""
    if t.dtype not in _EXPONENT or t.numel() == 0:
        return bool(torch.isfinite(t).all())
    view, mask = _EXPONENT[t.dtype]
    bits = t.reshape(-1).view(view)
    return all(
        int(torch.bitwise_and(bits[i : i + block], mask).max()) < mask for i in range(0, bits.numel(), block)
    )


class Merger:
    def __init__(self, models: dict[str, Path], steps: list[Step], options: MergeOptions) -> None:
        _reuse_freed_memory()
        self.steps, self.opt = steps, options
        used = {i.ref for s in steps for i in s.inputs} | {s.base for s in steps if s.base}
        step_names = {s.name for s in steps}
        self.ckpts = {
            n: Checkpoint(p)
            for n, p in models.items()
            if n in used - step_names or n == options.copy_files_from
        }
        self.names = validate_inputs(self.ckpts)
        first = next(iter(self.ckpts.values()))
        self.n_layers = first.config.get("num_hidden_layers")
        self.compute = BY_NAME[options.compute_dtype]
        self.device = torch.device(options.device)
        self.importance: dict[str, _Importance] = {}
        for s in steps:
            if s.method.needs_importance:
                for i in s.inputs:
                    if i.ref not in self.ckpts:
                        raise CheckpointError(
                            f"step {s.name}: Fisher merging needs model inputs, '{i.ref}' is a step"
                        )
                    self.importance[i.ref] = _Importance(_importance_file(self.ckpts[i.ref].path), self.names)
        self.by_name = {s.name: s for s in steps}
        # when every step turns a NaN/Inf input into a NaN/Inf output, checking the (smaller, cached)
        # output replaces a pass over every input; a non-finite output then names the input at fault
        self.check_outputs = options.check_finite and all(s.method.nonfinite_propagates for s in steps)

    # ---- reading ---------------------------------------------------------------------------------
    def _read(self, model: str, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        ck = self.ckpts[model]
        t = ck.tensor(name) if rows is None else ck.rows(name, *rows)
        if self.opt.check_finite and not self.check_outputs and t.is_floating_point() and not all_finite(t):
            raise CheckpointError(f"{ck.info[name].file}: tensor '{name}' contains NaN or Inf")
        return t

    def _check_inputs(self, name: str, rows: tuple[int, int] | None) -> None:
        """After a non-finite output: find the input that has the NaN/Inf (raises), else it overflowed."""
        for ck in self.ckpts.values():
            t = ck.tensor(name) if rows is None else ck.rows(name, *rows)
            if t.is_floating_point() and not all_finite(t):
                raise CheckpointError(f"{ck.info[name].file}: tensor '{name}' contains NaN or Inf")

    def _fetch(self, name: str, rows: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        return {m: self._read(m, name, rows) for m in self.ckpts}

    # ---- computing -------------------------------------------------------------------------------
    def _eval(
        self,
        step: Step,
        name: str,
        raw: dict[str, torch.Tensor],
        memo: dict[str, torch.Tensor],
        rows: tuple[int, int] | None,
    ) -> torch.Tensor:
        if step.name in memo:
            return memo[step.name]

        casts = step.method.casts_inputs  # takes stored dtypes and casts block by block itself

        def value(ref: str) -> torch.Tensor:
            if ref in self.by_name:
                return self._eval(self.by_name[ref], name, raw, memo, rows)
            stored = memo.setdefault(f"stored:{ref}", raw[ref].to(self.device))
            if casts:
                return stored
            key = f"input:{ref}"
            if key not in memo:  # convert once
                memo[key] = stored.to(self.compute)
            return memo[key]

        tensors = [value(i.ref) for i in step.inputs]
        base = value(step.base) if step.base else None
        params = step_params(step, name, self.n_layers)
        if casts:
            params["dtype"] = self.compute
            if step is self.steps[-1]:  # rounded to the output dtype block by block, while in cache
                params["out_dtype"] = self.out_dtype[name]
        if step.method.needs_importance:
            imp = [self.importance[i.ref].tensor(name) for i in step.inputs]
            if rows is not None:
                imp = [t[rows[0] : rows[1]] for t in imp]
            params["importance"] = [t.to(self.device, self.compute) for t in imp]
        out = step.method(tensors, base, **params)
        memo[step.name] = out
        return out

    def _blocks(self, name: str) -> list[tuple[int, int] | None]:
        info = next(iter(self.ckpts.values())).info[name]
        chain_separable = all(s.method.row_separable for s in self.steps)
        n = math.prod(info.shape)
        if not chain_separable or len(info.shape) < 2 or n <= self.opt.chunk_elements:
            return [None]
        per_row = n // info.shape[0]
        step = max(1, self.opt.chunk_elements // per_row)
        return [(i, min(i + step, info.shape[0])) for i in range(0, info.shape[0], step)]

    # ---- the pass --------------------------------------------------------------------------------
    def run(self, output_dir: Path, recipe: dict) -> dict:
        t0 = time.time()
        first = next(iter(self.ckpts.values()))
        self.out_dtype = out_dtype = {
            n: (BY_NAME[self.opt.out_dtype] if self.opt.out_dtype else first.info[n].dtype)
            for n in self.names
        }
        plan = [(n, first.info[n].shape, out_dtype[n]) for n in self.names]
        saved = [s for s in self.steps[:-1] if s.save]
        total_bytes = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        with atomic_dir(output_dir) as tmp:
            writers = {self.steps[-1].name: ShardWriter(tmp, plan, self.opt.max_shard_bytes)}
            for s in saved:
                writers[s.name] = ShardWriter(tmp / "intermediate" / s.name, plan, self.opt.max_shard_bytes)
            bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc="merging", disable=not self.opt.progress
            )
            work = [(n, rows) for n in self.names for rows in self._blocks(n)]
            self._stream(work, writers, bar)
            bar.close()
            for w in writers.values():
                w.close()
            src = self._copy_source()
            for d in [tmp, *[tmp / "intermediate" / s.name for s in saved]]:
                self._copy_files(src, d)
            record = provenance(self.ckpts, recipe, hash_inputs=self.opt.hash_inputs)
            record["seconds"] = round(time.time() - t0, 3)
            record["output_bytes"] = total_bytes
            (tmp / "merge_provenance.json").write_text(json.dumps(record, indent=2, default=str))
        log.info(
            "merged %d tensors (%.2f GB) into %s in %.1fs",
            len(self.names),
            total_bytes / 1e9,
            output_dir,
            time.time() - t0,
        )
        return record

    def _stream(self, work: list, writers: dict[str, ShardWriter], bar) -> None:
        """Read, merge and write every work item (a tensor, or a block of its rows), overlapped:
        the reader maps item k+1 while item k merges and the writer writes item k−1.
        Items of up to SMALL_ITEM entries merge whole on `lanes` threads, one item per thread (their
        serial parts, such as quantile selections, overlap another item's work); larger items merge
        one at a time with their blocks spread over the threads. Outputs are written in order."""
        lanes = blocks.workers() if self.device.type == "cpu" else 1
        one = dict(max_workers=1, initializer=torch.set_num_threads, initargs=(1,))  # no OpenMP spinning
        lane_pool = ThreadPoolExecutor(
            lanes, thread_name_prefix="merge-block-lane", initializer=torch.set_num_threads, initargs=(1,)
        )
        with ThreadPoolExecutor(**one) as reader, ThreadPoolExecutor(**one) as writer, lane_pool:
            inflight: deque = deque()  # (name, future of the outputs), in work order
            pending = None  # the write in progress: at most one output waits for the disk

            def hand_over() -> None:
                nonlocal pending
                name, outs = inflight.popleft()
                outs = outs.result()
                if pending is not None:
                    pending.result()
                pending = writer.submit(self._write, writers, name, outs, bar)

            nxt = reader.submit(self._fetch, *work[0])
            for k, (name, rows) in enumerate(work):
                raw = nxt.result()
                if k + 1 < len(work):
                    nxt = reader.submit(self._fetch, *work[k + 1])
                small = lanes > 1 and sum(t.numel() for t in raw.values()) <= SMALL_ITEM * len(raw)
                while inflight and (len(inflight) >= lanes or not small):
                    hand_over()
                if small:
                    inflight.append((name, lane_pool.submit(self._merge_item, name, rows, raw, writers)))
                else:
                    done: Future = Future()
                    done.set_result(self._merge_item(name, rows, raw, writers))
                    inflight.append((name, done))
                del raw
            while inflight:
                hand_over()
            if pending is not None:
                pending.result()

    def _merge_item(self, name: str, rows, raw: dict[str, torch.Tensor], writers) -> dict[str, torch.Tensor]:
        """The outputs to write for one item, in the output dtype and checked (on the merging thread,
        so the writer thread only writes)."""
        memo: dict[str, torch.Tensor] = {}
        self._eval(self.steps[-1], name, raw, memo, rows)
        outs = {s: memo[s].to(self.out_dtype[name]).cpu() for s in writers}
        for out in outs.values():
            if self.check_outputs and out.is_floating_point() and not all_finite(out):
                self._check_inputs(name, rows)
        return outs

    def _write(self, writers: dict[str, ShardWriter], name: str, outs: dict, bar) -> None:
        """Append the outputs (in the writer thread: overlaps the next merges)."""
        for step_name, w in writers.items():
            w.write(name, outs[step_name])
        bar.update(sum(o.numel() * o.element_size() for o in outs.values()))

    def _copy_source(self) -> Checkpoint:
        if self.opt.copy_files_from:
            if self.opt.copy_files_from not in self.ckpts:
                raise CheckpointError(
                    f"copy_files_from='{self.opt.copy_files_from}' is not one of the models "
                    f"{sorted(self.ckpts)}"
                )
            return self.ckpts[self.opt.copy_files_from]
        last = self.steps[-1]
        ref = last.base or last.inputs[0].ref
        while ref in self.by_name:
            s = self.by_name[ref]
            ref = s.base or s.inputs[0].ref
        return self.ckpts[ref]

    @staticmethod
    def _copy_files(src: Checkpoint, dst: Path) -> None:
        for f in src.path.iterdir():
            if f.is_file() and f.suffix not in SKIP_COPY and f.name not in SKIP_NAMES:
                shutil.copy2(f, dst / f.name)


def merge(
    models: dict[str, Path],
    steps: list[Step],
    output_dir: str | Path,
    options: MergeOptions | None = None,
    recipe: dict[str, Any] | None = None,
) -> dict:
    """Validate, then stream the merge into `output_dir` (atomic). Returns the provenance record."""
    return Merger(models, steps, options or MergeOptions()).run(Path(output_dir), recipe or {})
