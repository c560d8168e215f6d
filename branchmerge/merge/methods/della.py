"""DELLA: drop by magnitude-ranked probabilities, rescale, elect, fuse (Deep et al. 2024,
arXiv 2406.11617), as mergekit's `della` and `della_linear` compute it.

    Δ_i = θ_i − B
    MAGPRUNE   within each row of Δ_i (a 1-D tensor is one row) rank the c entries by |Δ_i|,
               r = 0 … c−1 ascending, and keep each with probability
                   p = density − ε + 2ε · r/(c−1)          (p = density when c = 1)
               density ≥ 1 keeps everything (and skips the rescale), density ≤ 0 nothing; otherwise
               density ± ε must lie in (0, 1)
    rescale    Δ̂_i = ‖Δ_i‖₁ / ‖m_i ⊙ Δ_i‖₁ · m_i ⊙ Δ_i  (whole tensor, mergekit's L1 matching; skipped
               when either norm is < 1e-7)
    della          W = B + λ · Σ_i e_i w_i Δ̂_i / Σ_i e_i w_i   (e_i: agrees with the elected sign of
                   Σ_i w_i Δ̂_i, ≥ 0 electing +; a denominator of 0 becomes 1)
    della_linear   W = B + λ · Σ_i w_i Δ̂_i                   (normalize: / Σ_i w_i)

Parameters: per model `weight` 1.0, `density` 1.0, `epsilon` 0.15; `normalize` (della true,
della_linear false), `rescale` true, `lambda_` 1.0, `seed` 0. The keep draws are uniform u < p per
entry, seeded per tensor, model and block (mergekit draws torch.bernoulli(p) from its global seed:
the same distribution). Rows are the last dimension (mergekit ranks along dim 1: the same for the
1-D and 2-D tensors of a transformer). Ties in |Δ| get distinct ranks in index order.
stats: the rescale factors (one pass drawing the masks); apply: draw the same masks, elect, fuse.
"""

from __future__ import annotations

import torch

from branchmerge.foundation import mix_seed
from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.task_vectors import delta, elect, l1_scale


def magprune(d: torch.Tensor, density: float, epsilon: float, seed: int, block: int) -> torch.Tensor:
    """The keep mask (bool, d's shape (rows, c)) of one block of Δ: u < p(rank of |d| in its row)."""
    rows, c = d.shape
    order = d.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=d.device).expand(rows, c))
    step = 2 * epsilon / (c - 1) if c > 1 else 0.0
    p = ranks.to(torch.float32).mul_(step).add_(density - epsilon if c > 1 else density)
    g = torch.Generator().manual_seed(mix_seed(seed, 7919 * (block + 1)))
    return torch.rand(d.shape, generator=g).to(d.device) < p


def check(name: str, density: float, epsilon: float) -> None:
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(
            f"{name}: density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}; "
            "lower epsilon"
        )


class Della(Method):
    __doc__ = __doc__
    needs_base = True
    view = "matrix"  # MAGPRUNE ranks within rows
    model_params = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    consensus: bool

    def stats(self, ctx) -> list[float | None]:
        """Per model: the rescale factor (None: density ≥ 1, Δ_i is kept whole)."""
        scales: list[float | None] = []
        for i, (d, e) in enumerate(zip(ctx.p.density, ctx.p.epsilon)):
            check(self.name, d, e)
            if d >= 1:
                scales.append(None)
            elif d <= 0 or not ctx.p.rescale:
                scales.append(1.0)
            else:
                seed = ctx.seed(i)
                scales.append(
                    l1_scale(ctx, i, lambda x, rows, d=d, e=e, s=seed: magprune(x, d, e, s, rows.index))
                )
        return scales

    def apply(self, ctx, scales, rows) -> torch.Tensor:
        p = ctx.p
        ds = []
        for i, (scale, d, e, w) in enumerate(zip(scales, p.density, p.epsilon, p.weight)):
            x = delta(ctx, rows, i)
            if scale is not None:
                x.mul_(magprune(x, d, e, ctx.seed(i), rows.index) if d > 0 else 0.0)
                if scale != 1.0:
                    x.mul_(scale)
            ds.append(x.mul_(w) if w != 1 else x)
        merged = elect(ds, p.weight, self.consensus, p.normalize)
        return rows.base().add_(merged, alpha=p.lambda_)


@register
class DellaTies(Della):
    name = "della"
    consensus = True
    global_params = {"normalize": True, "rescale": True, "lambda_": 1.0, "seed": 0}


@register
class DellaLinear(Della):
    name = "della_linear"
    consensus = False
    global_params = {"normalize": False, "rescale": True, "lambda_": 1.0, "seed": 0}
