"""Importance fusion: Arcee Fusion (mergekit `arcee_fusion`) for any number of experts (our own).

For base B and experts θ_1..θ_N with coefficients c_i (a 1-D tensor is one row):
    Δ_i = θ_i − B
    κ_i,r = Σ_j P_rj log(P_rj / Q_rj),  P = softmax(θ_i, −1) + 1e-8,  Q = softmax(B, −1) + 1e-8  (per row)
    S_i = |Δ_i| · κ_i,row                                                 (importance)
    τ_i = median(S_i) + k · (Q3 − Q1)(S_i),  k = 1.5
          (q-quantile = sorted(x)[floor(q·(m−1))] over all m entries, or, above 10⁶ entries, over a
          seeded uniform subsample of 10⁶ drawn with replacement; the median and the (Q1, Q3) pair
          come from two independent draws: `select.Subsample`)
    M_i = 1[S_i ≥ τ_i]
    W = B + Σ_i c_i M_i Δ_i / max(1, Σ_i M_i)
Why: the paper merges pairwise, so the result depends on the order ((math ⊕ science) ⊕ code and
(math ⊕ code) ⊕ science differ in Table 2), and the second step measures importance against a merge
rather than against the base. Here every expert is scored against the same base in one step; a
coordinate claimed by one expert takes that expert's change, one claimed by several the mean of their
changes (no double counting), and c_i scales expert i. N = 1, c = 1 is Arcee Fusion, bit for bit.
stats: κ_i per row and τ_i (S is never stored whole above 10⁶ entries: its subsamples are taken while
each block is in cache); apply: recomputes S per block (the same ops on the same values: the same
bits) and the masked mean.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.select import SAMPLE, Subsample, quantiles


def row_kl(r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """κ = Σ_j P·log(P / Q) per row of a block, (rows, 1) (one log per entry, not log P − log Q)."""
    p = torch.softmax(r, dim=-1).add_(1e-8)
    q = torch.softmax(b, dim=-1).add_(1e-8)
    return torch.div(p, q, out=q).log_().mul_(p).sum(-1, keepdim=True)


def threshold(ctx, i: int, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(κ_i per row, τ_i) of expert i, in one pass over the blocks."""
    kappa = torch.empty(ctx.n_rows, 1, dtype=ctx.dtype, device=ctx.base.device)
    small = ctx.numel <= SAMPLE
    s_all = torch.empty(ctx.n_rows, ctx.cols, dtype=ctx.dtype, device=ctx.base.device) if small else None
    sub = None if small else Subsample(ctx.spans, ctx.cols, ctx.seed(i), ctx.dtype, ctx.base.device)

    def first(rows) -> None:
        a, z = rows.start, rows.stop
        r, b = rows.model(i), rows.base()
        kappa[a:z] = row_kl(r, b)
        s = torch.sub(r, b, out=s_all[a:z] if small else None).abs_().mul_(kappa[a:z])
        if not small:
            sub.take(rows.index, s)

    ctx.map(first)
    if small:
        q1, med, q3 = quantiles(s_all, [0.25, 0.5, 0.75])
    else:
        (med,), (q1, q3) = ctx.map(
            lambda f: f(),
            [lambda: quantiles(sub.values[0], [0.5]), lambda: quantiles(sub.values[1], [0.25, 0.75])],
        )
    return kappa, med + k * (q3 - q1)


@register
class ImportanceFusion(Method):
    __doc__ = __doc__
    name = "importance_fusion"
    needs_base = True
    view = "matrix"  # κ is per row
    model_params = {"weight": 1.0}
    global_params = {"k": 1.5, "seed": 0}

    def stats(self, ctx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [threshold(ctx, i, ctx.p.k) for i in range(len(ctx.models))]

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        a, z = rows.start, rows.stop
        weight = getattr(ctx.p, "weight", [1.0] * len(stats))
        base = rows.base()
        total = claims = None
        for i, ((kappa, tau), c) in enumerate(zip(stats, weight)):
            d = rows.model(i).sub_(base)
            keep = torch.abs(d).mul_(kappa[a:z]) >= tau  # S ≥ τ
            term = (d.mul_(c) if c != 1 else d).mul_(keep)
            total = term if total is None else total.add_(term)
            claims = keep.to(ctx.dtype) if claims is None else claims.add_(keep)
        return base.add_(total.div_(claims.clamp_min_(1)))
