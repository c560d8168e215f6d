"""Task arithmetic (Ilharco et al., 2023, arXiv 2212.04089).

Δ_i = θ_i − B,    W = B + λ Σ_i w_i Δ_i
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


@register
class TaskArithmetic(Method):
    __doc__ = __doc__
    name = "task_arithmetic"
    needs_base = True
    model_params = {"weight": 1.0}
    global_params = {"lambda_": 1.0}

    def apply(self, ctx, _, rows) -> torch.Tensor:
        base = rows.base()
        delta = torch.zeros_like(base)
        for i, w in enumerate(ctx.p.weight):
            delta.add_(rows.model(i) - base, alpha=w)
        return base + ctx.p.lambda_ * delta
