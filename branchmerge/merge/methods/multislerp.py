"""Multi-SLERP: barycentric interpolation of N models on the hypersphere through the tangent space at
their weighted mean direction (Goddard 2024; mergekit's `multislerp`).

    x_i = θ_i − B with a base, else θ_i (whole flattened tensors);  w ← w / Σ w (normalize_weights)
    u_i = x_i / (‖x_i‖ + ε),  μ = Σ w_i u_i / ‖Σ w_i u_i‖
    T = Σ_i w_i (u_i − ⟨u_i, μ⟩ μ)                   (the tangent vectors at μ, averaged)
    W = B + (Σ_i w_i ‖x_i‖) · (cos τ · μ + sin τ / τ · T),   τ = ‖T‖ + ε   (the exponential map)
    ‖Σ w_i u_i‖ < ε: with 2 models W = B + Σ w_i x_i, with more an error (antipodal inputs);
    one model: W = θ_1.
Since μ ∝ Σ w_i u_i, T vanishes in exact arithmetic (W = B + Σ w_i ‖x_i‖ · cos ε · μ); it is computed
as mergekit does, so rounding matches too.

μ and T lie in the span of the x_i, so W = B + Σ_i c_i x_i with c from the Gram matrix
G_ij = ⟨x_i, x_j⟩ (float64, one pass over the blocks).
Parameters: per model `weight` 1.0; `normalize_weights` true, `eps` 1e-8.
stats: the Gram matrix → c; apply: the weighted sum, element-wise.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.task_vectors import gram


def multislerp_coefficients(g: torch.Tensor, w: torch.Tensor, eps: float, name: str = "") -> torch.Tensor:
    """c (N,) with W − B = Σ_i c_i x_i, from the Gram matrix g and the (normalised) weights w."""
    norms = g.diagonal().clamp_min(0).sqrt()
    shifted = norms + eps

    def norm(c: torch.Tensor) -> torch.Tensor:
        return (c @ g @ c).clamp_min(0).sqrt()

    mean = w / shifted  # Σ w_i u_i, as coefficients of the x_i
    mn = norm(mean)
    if mn < eps:
        if len(w) == 2:
            return w.clone()
        raise ValueError(
            f"multislerp: the weighted mean direction of '{name}' is zero (antipodal inputs whose weights "
            "cancel); change the weights"
        )
    mean = mean / mn
    dots = (g @ mean) / shifted  # ⟨u_i, μ⟩
    tangent = w / shifted - (w * dots).sum() * mean
    tau = norm(tangent) + eps
    return (w * norms).sum() * (torch.cos(tau) * mean + torch.sin(tau) / tau * tangent)


def inputs(ctx, rows) -> list[torch.Tensor]:
    xs = [rows.model(i) for i in range(len(ctx.models))]
    if ctx.base is not None:
        base = rows.stored_base()
        for x in xs:
            x.sub_(base)
    return xs


@register
class MultiSlerp(Method):
    __doc__ = __doc__
    name = "multislerp"
    model_params = {"weight": 1.0}
    global_params = {"normalize_weights": True, "eps": 1e-8}

    def stats(self, ctx) -> list[float] | None:
        """c, or None for one model (W = θ_1)."""
        if len(ctx.models) == 1:
            return None
        w = torch.tensor(ctx.p.weight, dtype=torch.float64)
        if ctx.p.normalize_weights:
            if w.sum() == 0:
                raise ValueError(
                    "multislerp: the weights sum to 0; set normalize_weights: false or change them"
                )
            w = w / w.sum()
        g = gram(ctx, lambda rows: inputs(ctx, rows))
        return multislerp_coefficients(g, w, float(ctx.p.eps), ctx.name).tolist()

    def apply(self, ctx, coef, rows) -> torch.Tensor:
        if coef is None:
            return rows.model(0)
        xs = inputs(ctx, rows)
        acc = xs[0].mul_(coef[0])
        for x, c in zip(xs[1:], coef[1:]):
            acc.add_(x, alpha=c)
        return acc.add_(rows.stored_base()) if ctx.base is not None else acc
