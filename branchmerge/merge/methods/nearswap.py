"""NearSwap: move the base toward a secondary model where the two are already close (mergekit's
`nearswap`; introduced with alchemonaut/QuartetAnemoi-70B, t = 0.0001).

    a = B, b = the model;  s = clamp(t / max(|a − b|, 1e-6), 0, 1)   (element-wise)
    W = s · b + (1 − s) · a

An entry within t of the base takes the model's value (s = 1); farther ones move by t/|a − b|.
Parameters: `t` 0.0001 (mergekit has no default).
stats: none; apply: the element-wise blend.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


@register
class NearSwap(Method):
    __doc__ = __doc__
    name = "nearswap"
    needs_base = True
    min_models = max_models = 1
    global_params = {"t": 0.0001}

    def apply(self, ctx, _, rows) -> torch.Tensor:
        a, b = rows.base(), rows.model(0)
        s = torch.div(ctx.p.t, (a - b).abs_().clamp_min_(1e-6)).clamp_(0, 1)
        return b.mul_(s).add_(a.mul_(s.neg_().add_(1)))
