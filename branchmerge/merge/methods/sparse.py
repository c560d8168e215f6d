"""Sparsified task arithmetic with optional sign consensus: TIES, DARE-linear and DARE-TIES are one
method configured three ways.

    Δ_i = θ_i − B
    sparsify   magnitude (TIES, Yadav et al. 2023, arXiv 2306.01708): keep exactly k = max(1,
               floor(density·n)) entries of largest |Δ_i| (mergekit's k), zero the rest. With t the
               k-th largest |Δ_i| (found exactly without a sort), every |Δ_i| > t is kept, and of the
               entries with |Δ_i| = t (bf16 deltas tie there by the hundreds) the first ones in flat
               (row-major) order, as many as make k: a stable descending sort's choice. mergekit keeps
               the same number but picks the tied entries by an unstable argsort, so its choice among
               them is arbitrary and differs from ours on those entries only;
               random (DARE, Yu et al. 2024, arXiv 2311.03099): keep each entry with probability
               p = density, rescale kept entries by 1/p. The draw is u < p·2^b for uniform b-bit
               integers u (b = 8, 16 or 32: the fewest bits in which p is exact, so p = 0.5 costs one
               random byte per entry; other p are rounded to a multiple of 2^-32), seeded per tensor
               name, model and block, so it never depends on order or threads.
    consensus  sign (TIES): s = +1 where Σ_i w_i Δ̂_i ≥ 0, else −1 (mergekit's election: a zero sum
               elects +); keep only entries with sign(w_i Δ̂_i) = s; none: keep all.
    W = B + λ · Σ_i w_i m_i Δ̂_i / D,   D = Σ_i w_i m_i (normalize; 1 where no model contributes)
                                       D = 1 (no normalize)
    where m_i marks the entries of model i kept by the consensus (nonzero after sparsification).
stats: the magnitude ranks (threshold + per-block tie counts) or the random masks' seeds;
apply: everything else, element-wise.
"""

from __future__ import annotations

import math

import torch

from branchmerge.foundation import mix_seed
from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.select import Rank
from branchmerge.merge.methods.task_vectors import abs_delta_at, delta, rank_over


class KeepMask:
    """Bernoulli(p) keep decisions for block number i, from random bits seeded by (seed, i) (see the
    module docstring): b-bit words u uniform on their whole range, kept iff u < p·2^b (a signed view
    shifts both sides by 2^(b−1), which keeps the words uniform and the probability p)."""

    def __init__(self, p: float, seed: int) -> None:
        for bits in (8, 16, 32):
            if (p * 2**bits).is_integer():
                break
        self.view = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[bits]
        self.bytes = bits // 8
        self.limit = round(p * 2**bits) - (0 if bits == 8 else 2 ** (bits - 1))
        self.seed = seed

    def __call__(self, i: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, 7919 * (i + 1)))
        words = torch.empty(-(-n * self.bytes // 8), dtype=torch.int64)
        words.random_(-(2**63), None, generator=g)  # all 64 bits uniform
        return words.view(self.view)[:n] < self.limit


def keep_count(density: float, n: int) -> int:
    """mergekit's k: max(1, floor(density·n)) for 0 < density < 1; n at density ≥ 1, 0 at ≤ 0."""
    if density >= 1:
        return n
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def magnitude_rank(ctx, i: int, density: float) -> Rank | None | float:
    """Where model i's k-th largest |θ_i − B| sits (a `Rank`); None = keep all, +inf = keep none."""
    n = ctx.numel
    k = keep_count(density, n)
    if k >= n:
        return None
    if k <= 0:
        return math.inf
    return rank_over(ctx, k, lambda rows: delta(ctx, rows, i).abs_(), abs_delta_at(ctx, i), ctx.seed(i))


class SparseTaskArithmetic(Method):
    __doc__ = __doc__
    needs_base = True
    model_params = {"weight": 1.0, "density": 1.0}
    sparsify: str  # "magnitude" | "random"
    consensus: str | None  # "sign" | None

    def stats(self, ctx) -> tuple[list, list]:
        """(ranks, masks), one of each per model (None where not used)."""
        density = ctx.p.density
        for d in density:
            if not 0 <= d <= 1:
                raise ValueError(f"density must be in [0, 1], got {d}")
        if self.sparsify == "magnitude":
            return [magnitude_rank(ctx, i, d) for i, d in enumerate(density)], [None] * len(density)
        masks = [KeepMask(d, ctx.seed(i)) if 0 < d < 1 else None for i, d in enumerate(density)]
        return [None] * len(density), masks

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        p = ctx.p
        base = rows.base()
        ds = [
            _sparsified(rows.model(i).sub_(base), rank, mask, d, w, rows.index, getattr(p, "rescale", True))
            for i, (rank, mask, d, w) in enumerate(zip(*stats, p.density, p.weight))
        ]
        merged = _combine(ds, p.weight, self.consensus, p.normalize)
        if p.lambda_ != 1:
            merged.mul_(p.lambda_)
        return base.add_(merged)


def _sparsified(d, rank, mask, p, w, block, rescale) -> torch.Tensor:
    """w · Δ̂ for one block of one model (d = Δ, modified in place)."""
    if isinstance(rank, Rank):
        d.mul_(rank.keep(d.abs(), block))
    elif rank is not None:  # +inf: keep none (a NaN/Inf entry still reaches the output)
        d.mul_(d.abs() >= rank)
    elif mask is not None:
        d.mul_(mask(block, d.numel()).to(d.device))
        if rescale:
            d.div_(p)
    elif p == 0:
        d.zero_()
    return d.mul_(w) if w != 1 else d


def _combine(ds: list[torch.Tensor], weight: list[float], consensus: str | None, normalize: bool):
    """Σ_i m_i w_iΔ̂_i / D for one block (the ds are w_iΔ̂_i; modified in place)."""
    total = ds[0].clone() if len(ds) > 1 else ds[0]
    for d in ds[1:]:
        total.add_(d)
    if consensus is None and not normalize:
        return total
    if consensus == "sign":
        s = torch.sign(total).masked_fill_(total == 0, 1.0)  # a zero sum elects + (as mergekit)
        keep = [torch.mul(d, s) > 0 for d in ds]  # same nonzero sign as the elected one (exact)
        total = ds[0].mul_(keep[0])
        for d, m in zip(ds[1:], keep[1:]):
            total.add_(d.mul_(m))
    else:
        keep = [d != 0 for d in ds]
    if not normalize:
        return total
    den = torch.zeros_like(total)
    for m, w in zip(keep, weight):
        den.add_(m, alpha=w)
    den.masked_fill_(den == 0, 1.0)
    return total.div_(den)


@register
class Ties(SparseTaskArithmetic):
    name = "ties"
    sparsify, consensus = "magnitude", "sign"
    global_params = {"normalize": True, "lambda_": 1.0}


@register
class DareLinear(SparseTaskArithmetic):
    name = "dare_linear"
    sparsify, consensus = "random", None
    global_params = {"normalize": False, "lambda_": 1.0, "rescale": True, "seed": 0}


@register
class DareTies(SparseTaskArithmetic):
    name = "dare_ties"
    sparsify, consensus = "random", "sign"
    global_params = {"normalize": True, "lambda_": 1.0, "rescale": True, "seed": 0}
