"""The streaming merge engine: validate everything, then one pass over tensor names.

For each tensor name (in the first input's file order) the recipe's steps are evaluated for that
tensor only, each by the block executor (`branchmerge.merge.executor`: a method's stats, then its
apply over cache-sized blocks of rows, inputs memory-mapped and cast block by block, outputs checked
finite and rounded to the output dtype block by block). The executor's one thread pool runs
everything: tensors of up to `chunk_elements` entries are evaluated whole, one per task, several at a
time (their serial parts, such as quantile selections, overlap); larger ones one at a time, their
stats here and their blocks spread over the pool. Writes are pool tasks too, in file order, so
computing tensor k overlaps writing tensor k−1. Intermediate steps live only in memory unless `save`.
The output folder is built beside the target and renamed at the end (`foundation.atomic_dir`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from branchmerge.config.schema import MergeOptionsConfig
from branchmerge.foundation import atomic_dir
from branchmerge.merge.executor import Context, make_pool, run_method
from branchmerge.merge.io import BY_NAME, Checkpoint, CheckpointError, ShardWriter
from branchmerge.merge.provenance import provenance
from branchmerge.merge.recipe import Step, layer_fraction, step_params

log = logging.getLogger(__name__)
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
        self.workers = max(1, torch.get_num_threads()) if self.device.type == "cpu" else 1

    # ---- computing -------------------------------------------------------------------------------
    def _evaluate(self, name: str, pool) -> tuple[dict[str, torch.Tensor], list[Future]]:
        """Every step for one tensor: the outputs to write (final and saved steps) and the futures of
        the final step's blocks still running on `pool` (none when `pool` is None: all done here)."""
        values = {m: ck.tensor(name).to(self.device) for m, ck in self.ckpts.items()}
        labels = {m: str(ck.info[name].file) for m, ck in self.ckpts.items()}
        layer = layer_fraction(name, self.n_layers)
        running: list[Future] = []
        for step in self.steps:
            last = step is self.steps[-1]
            refs = [i.ref for i in step.inputs] + ([step.base] if step.base else [])
            sources = [(labels.get(r, f"step '{r}'"), values[r]) for r in refs]
            importance = None
            if step.method.needs_importance:
                files = [self.importance[i.ref] for i in step.inputs]
                importance = [f.tensor(name).to(self.device) for f in files]
                sources += [(str(f.path), t) for f, t in zip(files, importance)]
            ctx = Context(
                view=step.method.view,
                models=[values[i.ref] for i in step.inputs],
                base=values[step.base] if step.base else None,
                params=step_params(step, name, self.n_layers),
                dtype=self.compute,
                name=name,
                layer=layer,
                importance=importance,
                pool=pool,
            )
            shape = next(iter(self.ckpts.values())).info[name].shape
            out = torch.empty(shape, dtype=self.out_dtype[name] if last else self.compute, device=self.device)
            futures = run_method(step.method, ctx, out, sources, check=self.opt.check_finite)
            if last:
                running = futures
            else:
                for f in futures:
                    f.result()
            values[step.name] = out
        return {s: values[s] for s in self.outputs}, running

    # ---- the pass --------------------------------------------------------------------------------
    def run(self, output_dir: Path, recipe: dict, chat_template: str | None = None) -> dict:
        t0 = time.time()
        first = next(iter(self.ckpts.values()))
        self.out_dtype = out_dtype = {
            n: (BY_NAME[self.opt.out_dtype] if self.opt.out_dtype else first.info[n].dtype)
            for n in self.names
        }
        plan = [(n, first.info[n].shape, out_dtype[n]) for n in self.names]
        saved = [s for s in self.steps[:-1] if s.save]
        self.outputs = [self.steps[-1].name] + [s.name for s in saved]
        total_bytes = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        with atomic_dir(output_dir) as tmp:
            writers = {self.steps[-1].name: ShardWriter(tmp, plan, self.opt.max_shard_bytes)}
            for s in saved:
                writers[s.name] = ShardWriter(tmp / "intermediate" / s.name, plan, self.opt.max_shard_bytes)
            bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc="merging", disable=not self.opt.progress
            )
            self._stream(writers, bar)
            bar.close()
            for w in writers.values():
                w.close()
            src = self._copy_source()
            for d in [tmp, *[tmp / "intermediate" / s.name for s in saved]]:
                self._copy_files(src, d)
                self._describe(d, chat_template)
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

    def _stream(self, writers: dict[str, ShardWriter], bar) -> None:
        """Evaluate and write every tensor, in file order, on one pool. Tensors of up to
        `chunk_elements` entries are one task each, at most `workers` in flight; a larger one starts
        when nothing else is in flight (so at most two large outputs are held: one computing, one being
        written). Only this thread waits on the pool, so no task ever waits on another."""
        first = next(iter(self.ckpts.values()))
        inflight: deque = deque()  # (name, a function that waits and returns the outputs)
        pending: Future | None = None  # the write in progress: at most one output waits for the disk
        pool = make_pool(self.workers)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this thread's stats too: no op waits at an OpenMP barrier

        def hand_over() -> None:
            nonlocal pending
            name, wait = inflight.popleft()
            outs = wait()
            if pending is not None:
                pending.result()
            pending = pool.submit(self._write, writers, name, outs, bar)

        try:
            for name in self.names:
                small = self.workers > 1 and math.prod(first.info[name].shape) <= self.opt.chunk_elements
                while inflight and (len(inflight) >= self.workers or not small):
                    hand_over()
                if small:
                    job = pool.submit(self._evaluate, name, None)
                    inflight.append((name, lambda job=job: job.result()[0]))
                else:
                    outs, running = self._evaluate(name, pool)
                    inflight.append((name, lambda o=outs, r=running: _when_done(o, r)))
            while inflight:
                hand_over()
            if pending is not None:
                pending.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)

    def _write(self, writers: dict[str, ShardWriter], name: str, outs: dict, bar) -> None:
        """Append the outputs (in the writer thread: overlaps the next merges)."""
        outs = {s: t.to(self.out_dtype[name]).cpu() for s, t in outs.items()}  # saved steps: compute dtype
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

    def _describe(self, folder: Path, chat_template: str | None) -> None:
        """The copied config.json states the written dtype (`torch_dtype`/`dtype`) when out_dtype is
        set; tokenizer_config.json gets `chat_template` when one is given (a mergekit YAML's)."""
        cfg = folder / "config.json"
        if self.opt.out_dtype and cfg.is_file():
            data = json.loads(cfg.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in data or key == "torch_dtype":
                    data[key] = self.opt.out_dtype
            cfg.write_text(json.dumps(data, indent=2) + "\n")
        if chat_template is not None:
            tok = folder / "tokenizer_config.json"
            data = json.loads(tok.read_text()) if tok.is_file() else {}
            data["chat_template"] = chat_template
            tok.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            jinja = folder / "chat_template.jinja"  # transformers 5 reads this file first: keep them equal
            if jinja.is_file():
                jinja.write_text(chat_template)

    @staticmethod
    def _copy_files(src: Checkpoint, dst: Path) -> None:
        for f in src.path.iterdir():
            if f.is_file() and f.suffix not in SKIP_COPY and f.name not in SKIP_NAMES:
                shutil.copy2(f, dst / f.name)


def _when_done(outs: dict[str, torch.Tensor], running: list[Future]) -> dict[str, torch.Tensor]:
    for f in running:
        f.result()
    return outs


def merge(
    models: dict[str, Path],
    steps: list[Step],
    output_dir: str | Path,
    options: MergeOptions | None = None,
    recipe: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> dict:
    """Validate, then stream the merge into `output_dir` (atomic). Returns the provenance record.
    `chat_template`: written into the output's tokenizer_config.json (None: the copied one stays)."""
    return Merger(models, steps, options or MergeOptions()).run(Path(output_dir), recipe or {}, chat_template)
