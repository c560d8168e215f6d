"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging
with Common and Task-Specific Subspaces", arXiv 2502.04959).

For each weight matrix, with task vectors Δ_i = θ_i − B ∈ R^{m×n}, i = 1..N, and r = min(m, n):
  Iso-C    Σ_i Δ_i = U Σ Vᵀ (thin SVD),  σ̄ = (1/r) Σ_j σ_j
           W = B + λ · σ̄ U Vᵀ          (the spectrum of the task-arithmetic sum made flat, isotropic)
  Iso-CTS  the common subspace: the top c singular triplets (U_c, Σ_c, V_c) of Σ_i Δ_i, with
               c = r − s·N,  s = min(round((r − ⌊f·r⌋) / N), ⌊r/N⌋)   (f = common_space_fraction)
           each task's own directions: the top s singular triplets (U_i, Σ_i, V_i) of
               Δ_i − U_c U_cᵀ Δ_i                                (Δ_i with the common subspace removed)
           U = [U_c U_1 … U_N],  V = [V_c V_1 … V_N] (r columns each),  σ̄ = mean of [Σ_c Σ_1 … Σ_N]
           W = B + λ · σ̄ U⊥ V⊥ᵀ,   U⊥, V⊥ the polar factors (nearest orthonormal-column matrices)
           With f = 1 (c = r) it is Iso-C, which is how Iso-C is implemented here.
λ is the paper's α (chosen on held-out tasks there). Non-matrix tensors, and the vocabulary matrices
unless `svd_vocab`, take the mean task vector, W = B + λ · (1/N) Σ_i Δ_i, as in the authors' code.

Memory: stats reads the whole matrix and holds, in fp32, the sum, its SVD and (Iso-CTS) one projected
Δ_i with its SVD and the concatenated factors: about five copies of the matrix at peak. apply writes
rows of B + (λσ̄ U⊥)[rows] · V⊥ᵀ block by block, on the executor's pool.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import register
from branchmerge.merge.methods.tsv import LowRankTaskVectors, polar, top


def split_rank(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(c, s): the common subspace's size and each task's, c + n·s = r (the task-specific total a
    multiple of n, as the authors' code rounds it)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {fraction}")
    s = min(round((r - int(r * fraction)) / n), r // n)
    return r - s * n, s


@register
class IsoCTS(LowRankTaskVectors):
    __doc__ = __doc__
    name = "iso_cts"
    global_params = {"lambda_": 1.0, "common_space_fraction": 0.8, "svd_vocab": False}

    def fraction(self, ctx) -> float:
        return ctx.p.common_space_fraction

    def lowrank(self, ctx, delta, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ̄ U⊥, V⊥ᵀ)."""
        total = delta(0)
        for i in range(1, n):
            total.add_(delta(i))
        c, s = split_rank(min(ctx.shape), n, self.fraction(ctx))
        u, sigma, vh = top(total, c)
        del total
        if s == 0:  # Iso-C: U, V already orthonormal
            return u * sigma.mean(), vh
        us, sigmas, vhs = [u], [sigma], [vh]
        for i in range(n):
            d = delta(i)
            d.sub_(u @ (u.T @ d))
            ui, si, vhi = top(d, s)
            us.append(ui), sigmas.append(si), vhs.append(vhi)
        return polar(torch.cat(us, 1)) * torch.cat(sigmas).mean(), polar(torch.cat(vhs, 0).T).T


@register
class IsoC(IsoCTS):
    __doc__ = __doc__
    name = "iso_c"
    global_params = {"lambda_": 1.0, "svd_vocab": False}

    def fraction(self, ctx) -> float:
        return 1.0
