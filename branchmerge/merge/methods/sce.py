"""SCE: select, calculate, erase (FuseChat 2.0; Wan et al. 2024, arXiv 2408.07990), as mergekit's
`sce` computes it.

    τ_i = θ_i − B,  i = 1 … N   (in the compute dtype)
    select     v = Var_i τ_i (population, per entry: the exact variance rounded once to the compute
               dtype, which is what torch.var gives mergekit); keep exactly k = ⌊select_topk · #{v ≠ 0}⌋
               entries of largest v, the first k of the stable descending order of v (equal v: the
               lower flat index first; mergekit's topk keeps as many but picks among entries tied at
               the cut arbitrarily): τ_i ← m ⊙ τ_i (one mask for all models; select_topk ≥ 1 keeps
               everything, k = 0 nothing)
    calculate  η_i = mean(τ_i²) / Σ_j mean(τ_j²) over the whole tensor, in the compute dtype as
               mergekit (means rounded to it, then the quotients); η_i = 1/N when Σ_j < 1e-6
    erase      s = +1 where Σ_i τ_i ≥ 0, else −1;  e_i = [sign τ_i = s]
    W = B + Σ_i η_i e_i τ_i / max(Σ_i η_i e_i, 1e-6)

Parameters: `select_topk` 1.0 (mergekit's `int8_mask` only changes its memory layout).
stats: the variance rank (a count pass and an exact selection with per-block tie counts) and the η_i
(a pass of squares); apply: select, erase and fuse, element-wise.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.select import RankWindow, gather
from branchmerge.merge.methods.task_vectors import accumulator, compute_base, delta, rank_window


def variance(taus: list[torch.Tensor]) -> torch.Tensor:
    """Var_i τ_i per entry (population), two passes in float64 rounded to the τ's dtype: torch.var's
    value (it accumulates in float64 on CPU) at a fraction of the cost of stack().var(0)."""
    xs = [t.to(torch.float64, copy=True) for t in taus]
    mean = xs[0].clone()
    for x in xs[1:]:
        mean.add_(x)
    mean.div_(len(xs))
    var = torch.zeros_like(mean)
    for x in xs:
        var.add_(x.sub_(mean).square_())
    return var.div_(len(xs)).to(taus[0].dtype)


def fuse_weights(means: list[float], dtype: torch.dtype) -> list[float]:
    """η from the models' mean τ², as mergekit computes them in the compute dtype: each mean rounded to
    it, their sum taken there (a Python float), each quotient rounded to it; 1/N when |Σ| < 1e-6."""
    m = torch.tensor(means, dtype=torch.float64).to(dtype)
    total = float(m.sum())
    if abs(total) < 1e-6:
        return torch.full_like(m, 1 / len(means)).tolist()
    return (m / total).tolist()


@register
class Sce(Method):
    __doc__ = __doc__
    name = "sce"
    needs_base = True
    global_params = {"select_topk": 1.0}

    def stats(self, ctx) -> tuple[RankWindow | None, list[float]]:
        """(the selected variance ranks, or None for all; η)."""
        window = self.selection(ctx)

        def squares(rows) -> torch.Tensor:
            taus = self.selected(ctx, rows, window)
            return torch.stack([t.square().sum(dtype=torch.float64) for t in taus])

        means = (ctx.map_sum(squares) / ctx.numel).tolist()
        return window, fuse_weights(means, ctx.dtype)

    def selection(self, ctx) -> RankWindow | None:
        """The k entries of largest variance (descending ranks [0, k))."""
        topk = ctx.p.select_topk
        if topk >= 1:
            return None
        if topk <= 0:
            return RankWindow(None, None, empty=True)
        n = len(ctx.models)

        def block_var(rows) -> torch.Tensor:
            return variance([delta(ctx, rows, i) for i in range(n)])

        nonzero = sum(ctx.map(lambda rows: int(torch.count_nonzero(block_var(rows)))))
        k = int(nonzero * topk)

        def var_at(idx: torch.Tensor) -> torch.Tensor:
            b = compute_base(ctx, gather(ctx.base, idx))
            return variance([gather(m, idx).to(ctx.dtype).sub_(b) for m in ctx.models])

        return rank_window(ctx, 0, k, block_var, var_at, ctx.seed(0))

    @staticmethod
    def selected(ctx, rows, window: RankWindow | None) -> list[torch.Tensor]:
        """The block's τ_i, masked by the variance selection."""
        taus = [delta(ctx, rows, i) for i in range(len(ctx.models))]
        if window is not None:
            keep = window.keep(variance(taus), rows.index)
            for t in taus:
                t.mul_(keep)
        return taus

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        window, eta = stats
        taus = self.selected(ctx, rows, window)
        dtype = taus[0].dtype
        total = taus[0].to(accumulator(dtype), copy=True)  # sums over models: as mergekit's
        for t in taus[1:]:
            total.add_(t)
        elected = (total >= 0).to(dtype).mul_(2).sub_(1)
        num, den = total.zero_(), torch.zeros_like(total)
        for t, w in zip(taus, eta):
            e = (torch.sign(t) == elected).to(dtype).mul_(w)
            num.add_(t.mul_(e))
            den.add_(e)
        return rows.base().add_(num.to(dtype).div_(den.to(dtype).clamp_min_(1e-6)))
