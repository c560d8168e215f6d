"""Passthrough: one model's tensor, optionally scaled (mergekit's `passthrough`).

W = s · θ        (s = `scale`, default 1: a copy in the output dtype)

On its own it copies (or rescales) one model; with `slices` (branchmerge/merge/slices.py) each output
layer is one source layer, which is how layer-stacking ("frankenmerge") configs are written.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


@register
class Passthrough(Method):
    __doc__ = __doc__
    name = "passthrough"
    max_models = 1
    model_params = {"scale": 1.0}

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        x = rows.model(0)
        s = ctx.p.scale[0]
        return x if s == 1 else x.mul_(s)
