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
1-D and 2-D tensors of a transformer). Ties in |Δ| get distinct ranks in index order (a sort of
unique int64 keys, so the ranks, and the result, are the same on every machine).
stats: the masks (one pass; kept bit-packed, numel/8 bytes per model) and the rescale factors;
apply: unpack the masks, elect, fuse.
"""

from __future__ import annotations

import numpy as np
import torch

from branchmerge.foundation import mix_seed
from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.task_vectors import RESCALE_EPS, delta, elect


def magprune(d: torch.Tensor, density: float, epsilon: float, seed: int, block: int) -> torch.Tensor:
    """The keep mask (bool, d's shape (rows, c)) of one block of Δ. Each row is sorted by |d| (keys
    |d|·2³² + column: unique); the entry at ascending position r is kept iff u_r < p(r), with u
    uniform, drawn in sorted order (u is i.i.d., so that is the same distribution)."""
    rows, c = d.shape
    bits = d.abs().float().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    order = torch.from_numpy(np.argsort(bits.bitwise_or_(torch.arange(c)).numpy(), axis=1))
    step = 2 * epsilon / (c - 1) if c > 1 else 0.0
    p = torch.arange(c, dtype=torch.float32).mul_(step).add_(density - epsilon if c > 1 else density)
    g = torch.Generator().manual_seed(mix_seed(seed, 7919 * (block + 1)))
    kept = torch.rand((rows, c), generator=g) < p
    return torch.empty((rows, c), dtype=torch.bool).scatter_(1, order, kept).to(d.device)


def check(name: str, density: float, epsilon: float) -> None:
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(
            f"{name}: density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}; "
            "lower epsilon"
        )


class Pruned:
    """One model's drops: `scale` (None: Δ kept whole; 0: dropped whole) and, when drawn in stats
    (to rescale), each block's mask as packed bits."""

    def __init__(self, scale: float | None, packed: list[np.ndarray] | None = None) -> None:
        self.scale, self.packed = scale, packed

    def mask(self, rows, shape) -> torch.Tensor:
        bits = np.unpackbits(self.packed[rows.index], count=shape[0] * shape[1])
        return torch.from_numpy(bits).view(torch.bool).reshape(shape)


class Della(Method):
    __doc__ = __doc__
    needs_base = True
    view = "matrix"  # MAGPRUNE ranks within rows
    model_params = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    consensus: bool

    def stats(self, ctx) -> list[Pruned]:
        out = []
        for i, (d, e) in enumerate(zip(ctx.p.density, ctx.p.epsilon)):
            check(self.name, d, e)
            if d >= 1 or d <= 0:
                out.append(Pruned(None if d >= 1 else 0.0))
            elif not ctx.p.rescale:
                out.append(Pruned(1.0))
            else:
                out.append(self.draw(ctx, i, d, e))
        return out

    @staticmethod
    def draw(ctx, i: int, density: float, epsilon: float) -> Pruned:
        """Every block's mask (packed) and the L1 rescale ‖Δ‖₁ / ‖m ⊙ Δ‖₁ (1 when either < 1e-7)."""
        seed = ctx.seed(i)

        def block(rows) -> tuple[float, float, np.ndarray]:
            d = delta(ctx, rows, i)
            m = magprune(d, density, epsilon, seed, rows.index)
            a = d.abs_()
            before, after = a.sum(dtype=torch.float64).item(), (a * m).sum(dtype=torch.float64).item()
            return before, after, np.packbits(m.cpu().numpy().reshape(-1))

        parts = ctx.map(block)
        before, after = sum(p[0] for p in parts), sum(p[1] for p in parts)
        scale = 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after
        return Pruned(scale, [p[2] for p in parts])

    def apply(self, ctx, pruned, rows) -> torch.Tensor:
        p = ctx.p
        ds = []
        for i, (pr, d, e, w) in enumerate(zip(pruned, p.density, p.epsilon, p.weight)):
            x = delta(ctx, rows, i)
            if pr.scale is not None:
                if pr.packed is not None:
                    x.mul_(pr.mask(rows, x.shape).to(x.device))
                elif pr.scale != 0:
                    x.mul_(magprune(x, d, e, ctx.seed(i), rows.index))
                if pr.scale != 1.0:
                    x.mul_(pr.scale)
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
