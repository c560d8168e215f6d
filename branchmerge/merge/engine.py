"""The streaming merge engine: validate everything, then one pass over tensor names.

Which tensors the output has and where each comes from is a layout (`branchmerge.merge.slices`: output
name -> steps, each model's source tensor, depth; the identity for a plain recipe, layer stacking for
a step with `slices`), and inputs whose vocabularies differ are re-indexed to the output vocabulary
first (`branchmerge.merge.vocab`). For each output tensor (in file order) the steps are evaluated for
that tensor only, each by the block executor (`branchmerge.merge.executor`: a method's stats, then its
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
from branchmerge.errors import MergeRecipeError
from branchmerge.foundation import atomic_dir
from branchmerge.merge.executor import Context, make_pool, run_method
from branchmerge.merge.io import BY_NAME, Checkpoint, CheckpointError, ShardWriter
from branchmerge.merge.provenance import provenance
from branchmerge.merge.recipe import LAYER, Step, layer_fraction, step_params
from branchmerge.merge.slices import TensorPlan, plain_layout, slice_step, sliced_layout
from branchmerge.merge.vocab import build as build_vocabulary
from branchmerge.merge.vocab import is_vocab_tensor

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


VOCAB_HINT = (
    " (vocabularies differ: keep the padded Qwen vocabulary in every branch, or give the merge an output "
    "vocabulary: `tokenizer_source: union | base | <model>` in a mergekit YAML)"
)


def _refs(step: Step) -> list[str]:
    """Every name a step reads (its slices' sources too)."""
    if step.slices is not None:
        return [r for sl in step.slices for r in sl.ranges]
    return [i.ref for i in step.inputs] + ([step.base] if step.base else [])


def validate_inputs(
    ckpts: dict[str, Checkpoint], ignore: set[str] = frozenset(), layers_may_differ: bool = False
) -> list[str]:
    """Same architecture, tensor names, shapes, vocabulary and embedding tying; returns the names.
    `ignore`: tensors whose rows are re-indexed (vocab_size may differ too); `layers_may_differ`:
    slices pick layers by index, so the layer count and layer tensors are checked by the layout."""
    problems: list[str] = []
    ref_name, ref = next(iter(ckpts.items()))
    skip = {"vocab_size"} if ignore else set()
    skip |= {"num_hidden_layers"} if layers_may_differ else set()

    def compared(ck: Checkpoint) -> set[str]:
        return {n for n in ck.info if n not in ignore and not (layers_may_differ and LAYER.search(n))}

    for _name, ck in ckpts.items():
        for key in ARCH_KEYS:
            a, b = ref.config.get(key), ck.config.get(key)
            if key == "tie_word_embeddings":
                a, b = bool(a), bool(b)
            if a != b and key not in skip:
                what = "tied vs untied embeddings" if key == "tie_word_embeddings" else key
                hint = VOCAB_HINT if key == "vocab_size" else ""
                problems.append(
                    f"{ck.path}/config.json: {what} differs from {ref_name} ({b!r} vs {a!r}){hint}"
                )
        mine, theirs = compared(ck), compared(ref)
        missing, extra = sorted(theirs - mine), sorted(mine - theirs)
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
        for t in sorted(mine & theirs):
            if ref.info[t].shape != ck.info[t].shape:
                hint = VOCAB_HINT if ("embed" in t or "lm_head" in t) else ""
                problems.append(
                    f"{ck.info[t].file}: tensor '{t}' has shape {list(ck.info[t].shape)}, "
                    f"{ref_name} has {list(ref.info[t].shape)}{hint}"
                )
        for t in sorted(ignore & set(ck.info) & set(ref.info)):
            if ref.info[t].shape[1:] != ck.info[t].shape[1:]:
                problems.append(
                    f"{ck.info[t].file}: tensor '{t}' rows have shape {list(ck.info[t].shape[1:])}, "
                    f"{ref_name}'s {list(ref.info[t].shape[1:])}"
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
    def __init__(
        self,
        models: dict[str, Path],
        steps: list[Step],
        options: MergeOptions,
        tokenizer: dict[str, Any] | None = None,
    ) -> None:
        _reuse_freed_memory()
        self.steps, self.opt = steps, options
        sliced = steps[-1].slices is not None
        used = {r for s in steps for r in _refs(s)}
        step_names = {s.name for s in steps}
        self.ckpts = {
            n: Checkpoint(p)
            for n, p in models.items()
            if n in used - step_names or n == options.copy_files_from
        }
        self.vocab = build_vocabulary(tokenizer, self.ckpts)
        vocab_names = set()
        if self.vocab is not None and not self.vocab.identity:
            vocab_names = {n for ck in self.ckpts.values() for n in ck.info if is_vocab_tensor(n)}
        names = validate_inputs(self.ckpts, ignore=vocab_names, layers_may_differ=sliced)
        if sliced:
            self.layout = sliced_layout(steps[-1], self.ckpts, vocab_names)
            self.steps = [slice_step(steps[-1], sl) for sl in steps[-1].slices]
        else:
            self.layout = plain_layout(steps, self.ckpts, names)
        self.names, self.n_layers = self.layout.names, self.layout.n_layers
        self.vocab_names = vocab_names
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
        for s in steps:
            for i in s.inputs if s.method.needs_activations else []:
                if i.params.get("coef", s.params.get("coef")) is None:
                    raise MergeRecipeError(
                        f"step {s.name}: {s.method.name} has no coefficients for '{i.ref}': merge through "
                        "merge.py with calibration.files=[...] (its activation pass) or give `coef`"
                    )
        self.by_name = {s.name: s for s in steps}
        self.workers = max(1, torch.get_num_threads()) if self.device.type == "cpu" else 1

    def shape(self, name: str) -> tuple[int, ...]:
        """The output tensor's shape: its first source's, with the output vocabulary's rows."""
        m, src = self.layout.plans[name].first
        shape = self.ckpts[m].info[src].shape
        return (self.vocab.rows, *shape[1:]) if name in self.vocab_names else shape

    # ---- computing -------------------------------------------------------------------------------
    def _read(self, name: str, plan: TensorPlan) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Each model's source tensor of one output tensor (vocabulary tensors re-indexed), and labels."""
        values = {m: self.ckpts[m].tensor(src).to(self.device) for m, src in plan.sources.items()}
        labels = {m: str(self.ckpts[m].info[src].file) for m, src in plan.sources.items()}
        if name in self.vocab_names:
            base = plan.steps[-1].base or self.vocab.base
            values = self.vocab.align(values, base, self.compute)
        return values, labels

    def _evaluate(self, name: str, pool) -> tuple[dict[str, torch.Tensor], list[Future]]:
        """Every step for one tensor: the outputs to write (final and saved steps) and the futures of
        the final step's blocks still running on `pool` (none when `pool` is None: all done here)."""
        plan = self.layout.plans[name]
        values, labels = self._read(name, plan)
        layer = plan.t if plan.t is not None else layer_fraction(name, self.n_layers)
        running: list[Future] = []
        for step in plan.steps:
            last = step is plan.steps[-1]
            refs = [i.ref for i in step.inputs] + ([step.base] if step.base else [])
            sources = [(labels.get(r, f"step '{r}'"), values[r]) for r in refs]
            importance = None
            if step.method.needs_importance:
                files = [self.importance[i.ref] for i in step.inputs]
                importance = [
                    f.tensor(plan.sources[i.ref]).to(self.device) for f, i in zip(files, step.inputs)
                ]
                sources += [(str(f.path), t) for f, t in zip(files, importance)]
            ctx = Context(
                view=step.method.view,
                models=[values[i.ref] for i in step.inputs],
                base=values[step.base] if step.base else None,
                params=step_params(step, name, self.n_layers, plan.t),
                dtype=self.compute,
                name=name,
                layer=layer,
                importance=importance,
                pool=pool,
            )
            out = torch.empty(
                self.shape(name), dtype=self.out_dtype[name] if last else self.compute, device=self.device
            )
            futures = run_method(step.method, ctx, out, sources, check=self.opt.check_finite)
            if last:
                running = futures
            else:
                for f in futures:
                    f.result()
            values[step.name] = out
        return {s: values[s] for s in self.outputs}, running

    # ---- the pass --------------------------------------------------------------------------------
    def run(
        self, output_dir: Path, recipe: dict, chat_template: str | None = None, extra: dict | None = None
    ) -> dict:
        t0 = time.time()
        self.out_dtype = out_dtype = {n: self._out_dtype(n) for n in self.names}
        plan = [(n, self.shape(n), out_dtype[n]) for n in self.names]
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
            record.update(extra or {})  # what ran before the merge (ACM's activation pass)
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
                small = self.workers > 1 and math.prod(self.shape(name)) <= self.opt.chunk_elements
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

    def _out_dtype(self, name: str) -> torch.dtype:
        if self.opt.out_dtype:
            return BY_NAME[self.opt.out_dtype]
        m, src = self.layout.plans[name].first
        return self.ckpts[m].info[src].dtype

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
        last = self.steps[-1] if self.steps[-1].slices is None else self.steps[0]
        ref = last.base or last.inputs[0].ref
        while ref in self.by_name:
            s = self.by_name[ref]
            ref = s.base or s.inputs[0].ref
        return self.ckpts[ref]

    def _describe(self, folder: Path, chat_template: str | None) -> None:
        """The copied config.json states the written dtype (`torch_dtype`/`dtype`) when out_dtype is
        set, and the layout's layer count / layer_types and the output vocabulary's size; a built
        tokenizer replaces the copied one; tokenizer_config.json gets `chat_template` when one is
        given (a mergekit YAML's)."""
        cfg = folder / "config.json"
        if self.vocab is not None and not self.vocab.identity:
            self.vocab.save(folder)
        updates = dict(self.layout.config)
        if self.vocab_names:
            updates["vocab_size"] = self.vocab.rows
        if self.opt.out_dtype:
            updates["torch_dtype"] = self.opt.out_dtype
        if updates and cfg.is_file():
            data = json.loads(cfg.read_text())
            if "dtype" in data and "torch_dtype" in updates:
                data["dtype"] = updates["torch_dtype"]
            cfg.write_text(json.dumps({**data, **updates}, indent=2) + "\n")
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
    tokenizer: dict[str, Any] | None = None,
    provenance_extra: dict[str, Any] | None = None,
) -> dict:
    """Validate, then stream the merge into `output_dir` (atomic). Returns the provenance record.
    `chat_template`: written into the output's tokenizer_config.json (None: the copied one stays);
    `tokenizer`: the output vocabulary and row mapping (`branchmerge.merge.vocab`; None: inputs share one);
    `provenance_extra`: more keys for merge_provenance.json (the activation pass's record)."""
    merger = Merger(models, steps, options or MergeOptions(), tokenizer)
    return merger.run(Path(output_dir), recipe or {}, chat_template, provenance_extra)
