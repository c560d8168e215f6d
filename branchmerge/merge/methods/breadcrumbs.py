"""Model Breadcrumbs: drop the largest and the smallest entries of each task vector (Davari &
Belilovsky 2024, arXiv 2312.06795), as mergekit's `breadcrumbs` and `breadcrumbs_ties` compute it.

    Δ_i = θ_i − B, n entries (whole tensor)
    keep   exactly t = ⌊density·n⌋ entries of |Δ_i| after dropping the ⌊γ·n⌋ largest, as mergekit:
           its ascending ranks [b, b + t) with b = max(0, n − t − ⌊γ·n⌋) (so γ shrinks when
           density + γ > 1), i.e. the descending ranks [n − b − t, n − b) of the stable descending
           order (equal |Δ_i|: the lower flat index ranks first, so a run of ties cut by either
           boundary loses its first entries to the top and keeps its first ones at the bottom).
           mergekit keeps as many but orders ties by an unstable sort, so its choice among entries
           tied at a boundary is arbitrary and may differ from ours there only. density ≥ 1 keeps
           everything, t = 0 nothing
    rescale (optional)  Δ̂_i = ‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ · m_i ⊙ Δ_i (skipped when either is < 1e-7; the
                        norms and factor rounded to the compute dtype, then w_i applied, as mergekit)
    breadcrumbs        W = B + λ · Σ_i w_i Δ̂_i                       (normalize: / Σ_i w_i)
    breadcrumbs_ties   W = B + λ · Σ_i e_i w_i Δ̂_i                   (normalize: / Σ_i e_i w_i)
                       e_i: agrees with the elected sign of Σ_i w_i Δ̂_i (≥ 0 elects +)

Parameters: per model `weight` 1.0, `density` 1.0, `gamma` 0.01; `normalize` false, `rescale` false,
`lambda_` 1.0 (mergekit's defaults for both).
stats: the two boundary ranks per model (exact selection with per-block tie counts, no sort) and the
rescale factors; apply: the rest.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.select import RankWindow
from branchmerge.merge.methods.task_vectors import (
    abs_delta_at,
    delta,
    elect,
    l1_scale,
    rank_window,
    rounded,
)


def band(ctx, i: int, density: float, gamma: float) -> RankWindow | None:
    """Model i's kept window of |Δ_i| ranks, or None when density ≥ 1 (keep all)."""
    if density >= 1:
        return None
    if density < 0 or not 0 <= gamma <= 1:
        raise ValueError(f"breadcrumbs: need density ≥ 0 and 0 ≤ gamma ≤ 1, got {density}, {gamma}")
    n = ctx.numel
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)

    def block_abs(rows) -> torch.Tensor:
        return delta(ctx, rows, i).abs_()

    return rank_window(ctx, n - bottom - keep, n - bottom, block_abs, abs_delta_at(ctx, i), ctx.seed(i))


def in_band(d: torch.Tensor, window: RankWindow, block: int) -> torch.Tensor:
    return window.keep(d.abs(), block)


class Breadcrumbs(Method):
    __doc__ = __doc__
    needs_base = True
    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    global_params = {"normalize": False, "rescale": False, "lambda_": 1.0}
    consensus: bool

    def stats(self, ctx) -> list[tuple[RankWindow | None, float]]:
        """Per model: (band, rescale factor)."""
        out = []
        for i, (d, g) in enumerate(zip(ctx.p.density, ctx.p.gamma)):
            window = band(ctx, i, d, g)
            scale = 1.0
            if window is not None and ctx.p.rescale:
                scale = l1_scale(ctx, i, lambda x, rows, w=window: in_band(x, w, rows.index))
            out.append((window, scale))
        return out

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        p = ctx.p
        ds = []
        for i, ((window, scale), w) in enumerate(zip(stats, p.weight)):
            x = delta(ctx, rows, i)
            if window is not None:
                x.mul_(in_band(x, window, rows.index))
            if scale != 1:  # rounded to the compute dtype after each product, as mergekit
                x.mul_(scale)
            if w != 1:
                x.mul_(rounded(w, x.dtype))
            ds.append(x)
        merged = elect(ds, p.weight, self.consensus, p.normalize)
        if p.lambda_ != 1:
            merged.mul_(p.lambda_)
        return rows.base().add_(merged)


@register
class BreadcrumbsLinear(Breadcrumbs):
    name = "breadcrumbs"
    consensus = False


@register
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
