"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere, scaled
to their mean norm (Karcher 1977; for model merging: mergekit's `karcher`, arXiv 2603.04972).

    u_i = θ_i / ‖θ_i‖ (whole tensors; models with ‖θ_i‖ ≤ tol are left out of the mean),
    a_i = 1/N renormalised over the models kept
    μ ← Σ a_i u_i / ‖·‖  (u_1 of the kept when that norm is < tol), then up to max_iter times:
        d_i = ⟨μ, u_i⟩,  φ_i = arccos d_i
        T = Σ_{φ_i ≥ tol} a_i φ_i / sin φ_i · (u_i − d_i μ)     (the mean of the log maps)
        stop if ‖T‖ < tol;  μ ← cos‖T‖ μ + sin‖T‖ T/‖T‖, renormalised (the exponential map)
    W = (1/N Σ_i ‖θ_i‖) · μ

Every quantity lives in the span of the u_i, so μ is carried as N coefficients and the iteration
needs only the Gram matrix G_ij = ⟨θ_i, θ_j⟩ (float64, one pass over the blocks). No base.
Parameters: `max_iter` 10, `tol` 1e-5.
stats: the Gram matrix and the iteration → W = Σ_i c_i θ_i; apply: that sum, element-wise.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.task_vectors import gram


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """c (N,) with W = Σ_i c_i θ_i, from the Gram matrix g (N × N, float64)."""
    n = g.shape[0]
    if n == 1:
        return torch.ones(1, dtype=g.dtype)
    norms = g.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    u = g * inv[:, None] * inv[None, :]  # Gram matrix of the unit vectors
    valid = norms > tol  # a NaN norm is not valid either
    if not bool(valid.any()):
        return torch.zeros(n, dtype=g.dtype)
    a = valid.to(g.dtype) / int(valid.sum())

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x @ u @ x).clamp_min(0).sqrt()

    mu = a.clone()
    mn = norm(mu)
    mu = torch.eye(n, dtype=g.dtype)[int(valid.nonzero()[0])] if mn < tol else mu / mn
    for _ in range(max_iter):
        dots = (u @ mu).clamp(-1, 1)
        phi = torch.arccos(dots)
        f = torch.where(valid & (phi >= tol), a * phi / torch.sin(phi), torch.zeros_like(phi))
        tangent = f - (f * dots).sum() * mu  # Σ_i f_i (u_i − d_i μ)
        tn = norm(tangent)
        if tn < tol:
            break
        mu = torch.cos(tn) * mu + torch.sin(tn) * tangent / tn
        un = norm(mu)
        if un > tol:
            mu = mu / un
    return norms.mean() * mu * inv


@register
class Karcher(Method):
    __doc__ = __doc__
    name = "karcher"
    global_params = {"max_iter": 10, "tol": 1e-5}

    def stats(self, ctx) -> list[float]:
        n = len(ctx.models)
        g = gram(ctx, lambda rows: [rows.stored(i) for i in range(n)])
        return karcher_coefficients(g, int(ctx.p.max_iter), float(ctx.p.tol)).tolist()

    def apply(self, ctx, coef, rows) -> torch.Tensor:
        acc = rows.model(0).mul_(coef[0])
        for i, c in enumerate(coef[1:], start=1):
            acc.add_(rows.stored(i), alpha=c)
        return acc
