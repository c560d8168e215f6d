"""Pieces shared by the methods that follow mergekit's generalized task arithmetic (DELLA, Model
Breadcrumbs), SCE and the spherical means (Karcher, Multi-SLERP). Registers no method.

    elect(ds, w, consensus, normalize)   Σ_i m_i d_i / D with mergekit's sign election and divisor
    accumulator(dtype), rounded(x, dtype) where sums over models accumulate; a scalar in the dtype
    l1_scale(ctx, i, kept)               ‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ (mergekit's `rescale`), by block
    rank_over(ctx, k, …)                 where the k-th largest of a per-entry quantity sits (`Rank`)
    rank_window(ctx, lo, hi, …)          its entries of descending ranks [lo, hi) (`RankWindow`)
    gram(ctx, vectors)                   G_ij = ⟨x_i, x_j⟩ over whole tensors (N × N, float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from branchmerge.merge.methods.select import SMALL, Rank, RankWindow, gather, rank_kth_largest

RESCALE_EPS = 1e-7  # mergekit skips the L1 rescale when either norm is below this


def delta(ctx, rows, i: int) -> torch.Tensor:
    """Δ_i = θ_i − B of one block, in the compute dtype (a new tensor): both rounded to the compute
    dtype first, as mergekit does (a stored base wider than the compute dtype is cast, not fused into
    the subtraction, which would round θ_i − B once instead of B and then the difference)."""
    return rows.model(i).sub_(compute_base(ctx, rows.stored_base()))


def compute_base(ctx, stored: torch.Tensor) -> torch.Tensor:
    """Stored base values as the compute dtype sees them: as they are when the compute dtype holds
    them exactly (the subtraction then casts for free), else rounded to it."""
    if torch.promote_types(stored.dtype, ctx.dtype) == ctx.dtype:
        return stored
    return stored.to(ctx.dtype)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """Where torch sums a stack of `dtype` values over its first axis (mergekit's `.sum(dim=0)`):
    float32 for bf16 and fp16, the dtype itself otherwise. Sums over models accumulate there and are
    rounded to the compute dtype once, as mergekit's are (adding in bf16 model by model rounds after
    every addition: a different last bit on ~1 entry in 5, enough to flip a near-zero sign sum)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def rounded(x: float, dtype: torch.dtype) -> float:
    """x as the compute dtype holds it (mergekit's weights and scales are tensors of that dtype)."""
    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


def elect(ds: list[torch.Tensor], weight: list[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """Σ_i m_i d_i / D for one block, the d_i = w_i Δ̂_i (modified in place), in their dtype with sums
    over models taken as mergekit's (`accumulator`):
    consensus  s = +1 where Σ_i d_i ≥ 0, else −1;  m_i = [sign d_i = s] (a zero entry never agrees;
               a NaN entry never agrees and is kept by multiplying it by 0);  D = Σ_i m_i w_i (1 where 0)
    none       m_i = 1;  D = Σ_i w_i (1 where |D| < 1e-8)
    D = 1 when not normalize; the w_i of D rounded to the dtype."""
    dtype = ds[0].dtype
    acc = accumulator(dtype)
    weight = [rounded(w, dtype) for w in weight]
    total = ds[0].to(acc, copy=True)
    for d in ds[1:]:
        total.add_(d)
    if not consensus:
        den = float(torch.tensor(weight, dtype=dtype).sum())
        total = total.to(dtype)
        return total.div_(den) if normalize and abs(den) >= 1e-8 else total
    elected = (total >= 0).to(dtype).mul_(2).sub_(1)
    den = torch.zeros_like(total)
    total.zero_()
    for d, w in zip(ds, weight):
        agree = torch.sign(d) == elected
        total.add_(d.mul_(agree))
        den.add_(agree, alpha=w)
    if not normalize:
        return total.to(dtype)
    den = den.to(dtype)
    return total.to(dtype).div_(den.masked_fill_(den == 0, 1.0))


def l1_scale(ctx, i: int, kept: Callable[[torch.Tensor, object], torch.Tensor]) -> float:
    """‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ over the whole tensor (float64 sums, one pass), as mergekit takes it in the
    compute dtype: each norm rounded to it, 1 when either is below 1e-7, else their quotient rounded
    to it. `kept(d, rows)`: the block's keep mask m_i (the same one `apply` will draw)."""

    def sums(rows) -> torch.Tensor:
        d = delta(ctx, rows, i)
        mask = kept(d, rows)
        a = d.abs_()
        return torch.stack([a.sum(dtype=torch.float64), (a * mask).sum(dtype=torch.float64)])

    before, after = (rounded(x, ctx.dtype) for x in ctx.map_sum(sums).tolist())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return rounded(before / after, ctx.dtype)


def abs_delta_at(ctx, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """idx -> |θ_i − B| at flat indices idx, in the compute dtype (as `delta` computes it)."""

    def at(idx: torch.Tensor) -> torch.Tensor:
        b = compute_base(ctx, gather(ctx.base, idx))
        return gather(ctx.models[i], idx).to(ctx.dtype, copy=True).sub_(b).abs_()

    return at


def rank_over(
    ctx,
    k: int,
    block_values: Callable[[object], torch.Tensor],
    values_at: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
) -> Rank:
    """Where the k-th largest (1 ≤ k ≤ n) of a per-entry quantity sits over the whole tensor (flat
    view), with its per-block counts: `block_values(rows)` gives a block's values (the very values
    `Rank.keep` will see in `apply`), `values_at(idx)` the values at flat indices (for the sample that
    brackets the answer). Small tensors: one selection over the whole tensor."""
    n = ctx.numel
    if n <= SMALL:
        whole = block_values(ctx.rows(0, ctx.n_rows)).reshape(-1)
        t = torch.kthvalue(whole, n - k + 1).values
        blocks = [whole[a * ctx.cols : z * ctx.cols] for a, z in ctx.spans]
        above = [int(torch.count_nonzero(b > t)) for b in blocks]
        return Rank(k, t, above, [int(torch.count_nonzero(b == t)) for b in blocks])
    return rank_kth_largest(n, k, seed, values_at, block_values, ctx.map)


def rank_window(
    ctx,
    lo: int,
    hi: int,
    block_values: Callable[[object], torch.Tensor],
    values_at: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
) -> RankWindow | None:
    """The entries of descending ranks [lo, hi) (0 ≤ lo ≤ hi ≤ n) of a per-entry quantity, ties broken
    by flat position (`RankWindow`); None when that is every entry. One exact selection per boundary
    that cuts the tensor (see `rank_over`)."""
    n = ctx.numel
    if lo <= 0 and hi >= n:
        return None
    if lo >= hi:
        return RankWindow(None, None, empty=True)
    skip = rank_over(ctx, lo, block_values, values_at, seed) if lo > 0 else None
    upto = rank_over(ctx, hi, block_values, values_at, seed) if hi < n else None
    return RankWindow(skip, upto)


def gram(ctx, vectors: Callable[[object], list[torch.Tensor]]) -> torch.Tensor:
    """G_ij = ⟨x_i, x_j⟩ over whole tensors (N × N, float64, summed block by block); `vectors(rows)`
    gives the N vectors' rows of one block."""

    def part(rows) -> torch.Tensor:
        x = torch.stack([v.reshape(-1) for v in vectors(rows)]).double()
        return x @ x.T

    return ctx.map_sum(part)
