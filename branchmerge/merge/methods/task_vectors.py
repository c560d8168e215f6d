"""Pieces shared by the methods that follow mergekit's generalized task arithmetic (DELLA, Model
Breadcrumbs), SCE and the spherical means (Karcher, Multi-SLERP). Registers no method.

    elect(ds, w, consensus, normalize)   Σ_i m_i d_i / D with mergekit's sign election and divisor
    l1_scale(ctx, i, kept)               ‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ (mergekit's `rescale`), by block
    kth_largest_over(ctx, k, …)          the exact k-th largest of a per-entry quantity
    gram(ctx, vectors)                   G_ij = ⟨x_i, x_j⟩ over whole tensors (N × N, float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from branchmerge.merge.methods.select import SMALL, kth_largest

RESCALE_EPS = 1e-7  # mergekit skips the L1 rescale when either norm is below this


def delta(ctx, rows, i: int) -> torch.Tensor:
    """Δ_i = θ_i − B of one block, in the compute dtype (a new tensor)."""
    return rows.model(i).sub_(rows.stored_base())


def elect(ds: list[torch.Tensor], weight: list[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """Σ_i m_i d_i / D for one block, the d_i = w_i Δ̂_i (modified in place):
    consensus  s = +1 where Σ_i d_i ≥ 0, else −1;  m_i = [sign d_i = s] (a zero entry never agrees;
               a NaN entry never agrees and is kept by multiplying it by 0);  D = Σ_i m_i w_i (1 where 0)
    none       m_i = 1;  D = Σ_i w_i (1 where |D| < 1e-8)
    D = 1 when not normalize."""
    total = ds[0].clone()
    for d in ds[1:]:
        total.add_(d)
    if not consensus:
        den = sum(weight)
        return total.div_(den) if normalize and abs(den) >= 1e-8 else total
    elected = (total >= 0).to(total.dtype).mul_(2).sub_(1)
    den = torch.zeros_like(total)
    total.zero_()
    for d, w in zip(ds, weight):
        agree = torch.sign(d) == elected
        total.add_(d.mul_(agree))
        den.add_(agree, alpha=w)
    if not normalize:
        return total
    return total.div_(den.masked_fill_(den == 0, 1.0))


def l1_scale(ctx, i: int, kept: Callable[[torch.Tensor, object], torch.Tensor]) -> float:
    """‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ over the whole tensor (float64 sums, one pass), 1 when either norm is
    below 1e-7. `kept(d, rows)`: the block's keep mask m_i (the same one `apply` will draw)."""

    def sums(rows) -> torch.Tensor:
        d = delta(ctx, rows, i)
        mask = kept(d, rows)
        a = d.abs_()
        return torch.stack([a.sum(dtype=torch.float64), (a * mask).sum(dtype=torch.float64)])

    before, after = torch.stack(ctx.map(sums)).sum(0).tolist()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def kth_largest_over(
    ctx,
    k: int,
    block_values: Callable[[object], torch.Tensor],
    values_at: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
) -> float:
    """The exact k-th largest (1 ≤ k ≤ n) of a per-entry quantity over the whole tensor (flat view):
    `block_values(rows)` gives a block's values, `values_at(idx)` the values at flat indices."""
    n = ctx.numel
    if n <= SMALL:
        return float(torch.kthvalue(block_values(ctx.rows(0, ctx.n_rows)).reshape(-1), n - k + 1).values)
    return float(kth_largest(n, k, seed, values_at, block_values, ctx.map))


def gram(ctx, vectors: Callable[[object], list[torch.Tensor]]) -> torch.Tensor:
    """G_ij = ⟨x_i, x_j⟩ over whole tensors (N × N, float64, summed block by block); `vectors(rows)`
    gives the N vectors' rows of one block."""

    def part(rows) -> torch.Tensor:
        x = torch.stack([v.reshape(-1) for v in vectors(rows)]).double()
        return x @ x.T

    return torch.stack(ctx.map(part)).sum(0)
