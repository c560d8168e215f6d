"""Fisher-weighted averaging (Matena & Raffel, 2022, arXiv 2111.09832).

    W = Σ_i w_i F_i ⊙ θ_i / Σ_i w_i F_i        (per coordinate; ε guards coordinates with no Fisher mass)
F_i is model i's diagonal Fisher: read from `fisher.safetensors` written by `train.py fisher.enabled=true`,
or estimated with `python -m branchmerge.merge.importance` over a calibration set.
Where Σ_i w_i F_i < ε the plain weighted average is used.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


@register
class Fisher(Method):
    __doc__ = __doc__
    name = "fisher"
    min_models = 2
    model_params = {"weight": 1.0}
    global_params = {"eps": 1e-12}
    needs_importance = True

    def apply(self, ctx, _, rows) -> torch.Tensor:
        weight, eps = ctx.p.weight, ctx.p.eps
        thetas = [rows.model(i) for i in range(len(weight))]
        num, den = torch.zeros_like(thetas[0]), torch.zeros_like(thetas[0])
        for i, (t, w) in enumerate(zip(thetas, weight)):
            wf = w * rows.importance(i)
            num.add_(wf * t)
            den.add_(wf)
        plain = sum(w * t for w, t in zip(weight, thetas)) / sum(weight)
        # the plain average only where the mass is finite and ≤ ε: a NaN/Inf importance stays NaN/Inf
        return torch.where((den <= eps) & den.isfinite(), plain, num / den.clamp_min(eps))
