"""Linear average / model soup (Wortsman et al., 2022, arXiv 2203.05482).

W = Σ_i w_i θ_i / Σ_i w_i        (normalize=true; otherwise W = Σ_i w_i θ_i)
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


@register
class Linear(Method):
    __doc__ = __doc__
    name = "linear"
    model_params = {"weight": 1.0}
    global_params = {"normalize": True}

    def stats(self, ctx) -> list[float]:
        """The scales s_i = w_i / Σ w (or w_i)."""
        weight, total = ctx.p.weight, sum(ctx.p.weight)
        if ctx.p.normalize and total == 0:
            raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
        return [w / total for w in weight] if ctx.p.normalize else list(weight)

    def apply(self, ctx, scale, rows) -> torch.Tensor:
        # a 1-element tensor (not a Python scalar) makes bf16 · s compute in the compute dtype: one
        # cast-and-scale op straight from the stored rows
        acc = torch.mul(
            rows.stored(0), torch.tensor([scale[0]], dtype=ctx.dtype, device=ctx.models[0].device)
        )
        for i, s in enumerate(scale[1:], start=1):
            acc.add_(rows.stored(i), alpha=s)
        return acc
