"""Model Breadcrumbs: drop the largest and the smallest entries of each task vector (Davari &
Belilovsky 2024, arXiv 2312.06795), as mergekit's `breadcrumbs` and `breadcrumbs_ties` compute it.

    Δ_i = θ_i − B, n entries (whole tensor)
    keep   t = ⌊density·n⌋ entries of |Δ_i| after dropping the ⌊γ·n⌋ largest: ascending ranks
           [b, b + t) with b = max(0, n − t − ⌊γ·n⌋) (so γ shrinks when density + γ > 1);
           i.e. lo ≤ |Δ_i| ≤ hi, lo = the (n−b)-th largest, hi = the (n−b−t+1)-th largest (exact);
           entries tied at a threshold are all kept (mergekit keeps exactly t, breaking ties by sort
           order); density ≥ 1 keeps everything
    rescale (optional)  Δ̂_i = ‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ · m_i ⊙ Δ_i (skipped when either is < 1e-7)
    breadcrumbs        W = B + λ · Σ_i w_i Δ̂_i                       (normalize: / Σ_i w_i)
    breadcrumbs_ties   W = B + λ · Σ_i e_i w_i Δ̂_i                   (normalize: / Σ_i e_i w_i)
                       e_i: agrees with the elected sign of Σ_i w_i Δ̂_i (≥ 0 elects +)

Parameters: per model `weight` 1.0, `density` 1.0, `gamma` 0.01; `normalize` false, `rescale` false,
`lambda_` 1.0 (mergekit's defaults for both).
stats: the two thresholds per model (exact selection, no sort) and the rescale factors; apply: the rest.
"""

from __future__ import annotations

import math

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.select import gather
from branchmerge.merge.methods.task_vectors import delta, elect, kth_largest_over, l1_scale

Band = tuple[float, float]  # keep lo ≤ |Δ| ≤ hi


def band(ctx, i: int, density: float, gamma: float) -> Band | None:
    """Model i's (lo, hi), or None when density ≥ 1."""
    if density >= 1:
        return None
    if density < 0 or not 0 <= gamma <= 1:
        raise ValueError(f"breadcrumbs: need density ≥ 0 and 0 ≤ gamma ≤ 1, got {density}, {gamma}")
    n = ctx.numel
    keep, top = int(density * n), int(gamma * n)
    if keep == 0:
        return math.inf, -math.inf
    bottom = max(0, n - keep - top)

    def block_abs(rows) -> torch.Tensor:
        return delta(ctx, rows, i).abs_()

    def at(idx: torch.Tensor) -> torch.Tensor:
        return gather(ctx.models[i], idx).to(ctx.dtype, copy=True).sub_(gather(ctx.base, idx)).abs_()

    def kth(k: int) -> float:
        return kth_largest_over(ctx, k, block_abs, at, ctx.seed(i))

    lo = kth(n - bottom) if bottom > 0 else 0.0
    hi = kth(n - bottom - keep + 1) if bottom + keep < n else math.inf
    return lo, hi


def in_band(d: torch.Tensor, lohi: Band) -> torch.Tensor:
    a = d.abs()
    return (a >= lohi[0]).logical_and_(a <= lohi[1])


class Breadcrumbs(Method):
    __doc__ = __doc__
    needs_base = True
    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    global_params = {"normalize": False, "rescale": False, "lambda_": 1.0}
    consensus: bool

    def stats(self, ctx) -> list[tuple[Band | None, float]]:
        """Per model: (band, rescale factor)."""
        out = []
        for i, (d, g) in enumerate(zip(ctx.p.density, ctx.p.gamma)):
            lohi = band(ctx, i, d, g)
            scale = 1.0
            if lohi is not None and ctx.p.rescale:
                scale = l1_scale(ctx, i, lambda x, rows, lohi=lohi: in_band(x, lohi))
            out.append((lohi, scale))
        return out

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        p = ctx.p
        ds = []
        for i, ((lohi, scale), w) in enumerate(zip(stats, p.weight)):
            x = delta(ctx, rows, i)
            if lohi is not None:
                x.mul_(in_band(x, lohi))
            if scale * w != 1:
                x.mul_(scale * w)
            ds.append(x)
        merged = elect(ds, p.weight, self.consensus, p.normalize)
        return rows.base().add_(merged, alpha=p.lambda_)


@register
class BreadcrumbsLinear(Breadcrumbs):
    name = "breadcrumbs"
    consensus = False


@register
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
