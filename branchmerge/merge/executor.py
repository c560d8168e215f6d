"""The block executor: runs one merge method on one tensor, in cache-sized blocks of rows.

A method (`branchmerge.merge.methods.Method`) sees a tensor through a `Context`, in two phases:

    stats = method.stats(ctx)                  # whole-tensor facts: thresholds, quantiles, norms, seeds
    out[a:z] = method.apply(ctx, stats, rows)  # for every block of rows, on the thread pool

The executor owns everything else: the row view (`flat`: one entry per row, for element-wise methods;
`matrix`: rows of the (…, last dim) view), the blocks (BLOCK = 2¹⁸ entries: 1 MB in fp32, so a block's
temporaries stay in cache), the compute dtype (inputs stay in their stored dtype, memory-mapped;
`Rows.model(i)` casts one block at a time, so no full-size compute-dtype copy is ever made), the
output dtype (each block is rounded into the output while in cache), per-tensor seeds, the NaN/Inf
check and the one thread pool. Results never depend on the number of threads or the order blocks
finish in: each block writes its own rows, and per-block randomness is seeded by the block's index.

Why a pool of single-threaded workers rather than torch's intra-op threads: every torch op is a
fork/join over all cores, so ~40 small ops per block wait at ~40 barriers, and on a shared machine one
descheduled OpenMP thread stalls every op. Workers pulling whole blocks from a queue have no barrier.

LiNeS (Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging", arXiv 2410.17146), for any method with a base: a step's `lines: {alpha, beta}` (`ctx.p.lines`)
scales the merged task vector by depth, W = B + λ(ℓ) · (apply(…) − B), see `lines_scale`.

NaN/Inf: each output block is checked (max(bits & exponent mask) < mask); every method lets a NaN/Inf
input entry reach the output (a test holds each registered method to it), so a clean output proves
clean inputs, and a dirty block re-checks its inputs to name the file at fault.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import torch

from branchmerge.foundation import mix_seed
from branchmerge.merge.io import CheckpointError

_IN_LAYER = re.compile(r"\.layers\.\d+\.")  # a tensor of one of the numbered transformer blocks
BLOCK = 1 << 18  # entries per block (1 MB in fp32): a block's ~10 live temporaries stay in cache

# exponent bits of IEEE formats: a value is NaN or Inf iff they are all set
_EXPONENT = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}


def all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """No NaN/Inf in t: max(bits & exponent_mask) < exponent_mask over cache-sized blocks (one integer
    pass at memory speed; 20x cheaper than a float64 sum of bf16 on CPU)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype not in _EXPONENT:
        return bool(torch.isfinite(t).all())
    view, mask = _EXPONENT[t.dtype]
    bits = t.reshape(-1).view(view)
    return all(
        int(torch.bitwise_and(bits[i : i + block], mask).max()) < mask for i in range(0, bits.numel(), block)
    )


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A per-(tensor, model) seed: results do not depend on the order tensors are processed in."""
    return mix_seed(seed, zlib.crc32(name.encode()) * 31 + index)


def make_pool(workers: int) -> ThreadPoolExecutor:
    """The executor's pool: `workers` threads, each running torch with one intra-op thread."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix="merge", initializer=torch.set_num_threads, initargs=(1,)
    )


def _as_view(t: torch.Tensor, view: str) -> torch.Tensor:
    if view == "flat":
        return t.reshape(-1)
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(-1, t.shape[-1])


def row_spans(n_rows: int, cols: int) -> list[tuple[int, int]]:
    """The blocks: consecutive row ranges of about BLOCK entries (cols = 1 in the flat view)."""
    step = max(1, BLOCK // max(1, cols))
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


class Rows:
    """Rows [start, stop) of every input of one tensor, block number `index` of the context's blocks.
    `model(i)` / `base()` / `importance(i)`: new tensors in the compute dtype (safe to modify in place);
    `stored(i)` / `stored_base()`: the stored-dtype rows themselves (read-only), for a method that fuses
    the cast into its first op."""

    def __init__(self, ctx: Context, index: int, start: int, stop: int) -> None:
        self.ctx, self.index, self.start, self.stop = ctx, index, start, stop

    def stored(self, i: int) -> torch.Tensor:
        return self.ctx.models[i][self.start : self.stop]

    def stored_base(self) -> torch.Tensor:
        return self.ctx.base[self.start : self.stop]

    def model(self, i: int) -> torch.Tensor:
        return self.stored(i).to(self.ctx.dtype, copy=True)

    def base(self) -> torch.Tensor:
        return self.stored_base().to(self.ctx.dtype, copy=True)

    def importance(self, i: int) -> torch.Tensor:
        return self.ctx.importance[i][self.start : self.stop].to(self.ctx.dtype, copy=True)


class Context:
    """One tensor as a method sees it: `name`, `layer` (depth in [0, 1], None when unknown), `dtype`
    (compute), `p` (parameters resolved for this tensor; per-model ones as lists), `models` / `base` /
    `importance` (whole stored-dtype tensors in the method's view: (n,) or (rows, cols)), `shape` (the
    tensor's), `n_rows`, `cols`, `numel`, `spans` (the blocks' row ranges)."""

    def __init__(
        self,
        *,
        view: str,
        models: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
        dtype: torch.dtype,
        name: str = "",
        layer: float | None = None,
        importance: list[torch.Tensor] | None = None,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        ref = base if base is not None else models[0]
        self.shape, self.numel = tuple(ref.shape), ref.numel()
        self.name, self.layer, self.dtype, self.pool = name, layer, dtype, pool
        self.p = SimpleNamespace(**params)
        self.models = [_as_view(t, view) for t in models]
        self.base = None if base is None else _as_view(base, view)
        self.importance = None if importance is None else [_as_view(t, view) for t in importance]
        v = _as_view(ref, view)
        self.n_rows, self.cols = v.shape[0], (1 if view == "flat" else v.shape[1])
        self.spans = row_spans(self.n_rows, self.cols)
        self.applying = False

    def seed(self, i: int = 0) -> int:
        """Model i's seed for this tensor, from the `seed` parameter (0 when the method has none)."""
        return tensor_seed(getattr(self.p, "seed", 0), self.name, i)

    def rows(self, start: int, stop: int, index: int = 0) -> Rows:
        return Rows(self, index, start, stop)

    def blocks(self) -> list[Rows]:
        return [Rows(self, k, a, z) for k, (a, z) in enumerate(self.spans)]

    def map(self, fn: Callable[[Any], Any], items: Iterable | None = None) -> list:
        """[fn(x) for x in items] (default: every block's Rows), spread over the pool, in order.
        For `stats` only: `apply` already runs on the pool, one block per call."""
        if self.applying:
            raise RuntimeError("Context.map is for stats(); apply() gets one block and must not fan out")
        items = self.blocks() if items is None else list(items)
        if self.pool is None or len(items) < 2:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    def map_sum(self, fn: Callable[[Rows], torch.Tensor]) -> torch.Tensor:
        """Σ over the blocks of fn(rows), small tensors of one shape and dtype, summed in block order
        (the value of `torch.stack(self.map(fn)).sum(0)`). Each block's result leaves its worker as
        Python numbers: a tensor kept until the sum would sit in the heap hole the block's temporaries
        had just freed, the next block's temporaries could not reuse it, and the heap grew by a block's
        temporaries per block (0.6 GB for Karcher's Gram pass over a 28 M-entry embedding)."""
        dtypes: list[torch.dtype] = []

        def one(rows: Rows) -> list | float:
            r = fn(rows)
            dtypes.append(r.dtype)
            return r.tolist()

        parts = self.map(one)
        return torch.tensor(parts, dtype=dtypes[0] if dtypes else torch.float64).sum(0)


def lines_scale(ctx: Context, method) -> float | None:
    """LiNeS's λ for this tensor, or None when the step has no `lines`:
        λ(ℓ) = α + β · ℓ / (L − 1)   for a tensor of block ℓ = 0..L−1 (ctx.layer = ℓ / (L − 1))
        λ = α                        for every other tensor (embeddings, final norm, lm_head), as the
                                     authors' code scales every parameter outside the numbered blocks
    so shallow layers keep little of the task vectors (less forgetting) and deep ones more."""
    lines = getattr(ctx.p, "lines", None)
    if lines is None:
        return None
    if not method.needs_base:
        raise ValueError(f"lines scales task vectors θ − B: {method.name} has no base model")
    depth = ctx.layer if ctx.layer is not None and _IN_LAYER.search(ctx.name) else 0.0
    return lines["alpha"] + lines["beta"] * depth


def run_method(
    method, ctx: Context, out: torch.Tensor, sources: list[tuple[str, torch.Tensor]], check: bool = True
) -> list[Future]:
    """stats, then apply block by block into `out` (the tensor's shape, any dtype), each block's rows
    rescaled toward the base by LiNeS when the step asks (`lines_scale`). On the pool the blocks are
    submitted and their futures returned (the caller waits); without one they run here.
    `sources`: (label, stored tensor) of every input, to name the one at fault after a NaN/Inf."""
    stats = method.stats(ctx)
    lam = lines_scale(ctx, method)
    ctx.applying = True
    dst = _as_view(out, method.view)

    def block(rows: Rows) -> None:
        res = method.apply(ctx, stats, rows)
        if lam is not None:  # B + λ(res − B); a NaN/Inf in res or B stays non-finite for every λ
            res = torch.lerp(rows.base(), res, lam)
        o = dst[rows.start : rows.stop]
        if res.shape != o.shape:
            raise RuntimeError(
                f"method '{method.name}' returned rows of shape {list(res.shape)} for '{ctx.name}', "
                f"expected {list(o.shape)}"
            )
        o.copy_(res)
        if check and not all_finite(o):
            _name_the_input(ctx.name, method.view, sources, rows.start, rows.stop)

    if ctx.pool is None:
        for rows in ctx.blocks():
            block(rows)
        return []
    return [ctx.pool.submit(block, rows) for rows in ctx.blocks()]


def _name_the_input(name: str, view: str, sources, a: int, z: int) -> None:
    """After a NaN/Inf output block: raise naming the input that holds one, else the overflow."""
    for label, t in sources:
        if not all_finite(_as_view(t, view)[a:z]):
            raise CheckpointError(f"{label}: tensor '{name}' contains NaN or Inf")
    raise CheckpointError(
        f"tensor '{name}': the merge produced NaN or Inf from finite inputs (an overflow in the compute "
        "or output dtype; use options.compute_dtype=float32)"
    )


def merge_tensors(
    method,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    tensor_name: str = "",
    layer_fraction: float | None = None,
    importance: list[torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    **params: Any,
) -> torch.Tensor:
    """One method on in-memory tensors (no pool): the merged tensor in `out_dtype` (default `dtype`,
    which defaults to the inputs' dtype). Missing parameters take the method's defaults."""
    ref = base if base is not None else tensors[0]
    dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
    full = {p: [v] * len(tensors) for p, v in method.model_params.items()}
    full.update(method.global_params)
    full.update(params)
    ctx = Context(
        view=method.view,
        models=list(tensors),
        base=base,
        params=full,
        dtype=dtype,
        name=tensor_name,
        layer=layer_fraction,
        importance=importance,
    )
    out = torch.empty(ref.shape, dtype=out_dtype or dtype, device=ref.device)
    run_method(method, ctx, out, [], check=False)
    return out
