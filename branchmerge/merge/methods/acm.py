"""Activation-Guided Consensus Merging, ACM (Yao et al., NeurIPS 2025, arXiv 2505.14009): task
arithmetic whose coefficients are set per decoder layer from the mutual information between the base's
and each branch's activations on calibration rows.

    Δ_i = θ_i − B,   W_ℓ = B_ℓ + λ Σ_i w_i c_iℓ Δ_iℓ
    c_iℓ = 1 − NMI(a_B(ℓ), a_i(ℓ))      layer ℓ's coefficient for branch i (NMI ∈ [0, 1])
    c_i  = mean_ℓ c_iℓ                  every tensor outside the decoder layers (embeddings, norm, lm_head)

The paper's rule (from its abstract and published summaries; its method section was not available
when this was written): a layer whose activations the branch left highly informative of the base's
(high mutual information, redundant) gets a small coefficient, one that diverged (low mutual
information, where the task lives) a large one; no gradients, one forward pass per model. Our choices,
to check against the paper's equations: the activations are each decoder layer's output hidden
states, sampled at the same (token, channel) entries in every model; MI by equal-frequency bins,
normalised as NMI = I / sqrt(H_B H_i); c = 1 − NMI without renormalising across layers; the mean
outside the layers (branchmerge/merge/activations.py, docs/merge_methods.md). The paper also plugs the
coefficients into TIES; this method is the task-arithmetic form.

The coefficients come from the activation pass merge.py runs before the streaming merge (calibration.*
in conf/merge.yaml), which writes them into each input's `coef` as a pattern map
{".layers.0.": c_i0, …, "default": c_i}; a `coef` given by hand (number, per-layer list or pattern map)
skips the pass for that input. Without one the method refuses to run.
"""

from __future__ import annotations

import torch

from branchmerge.errors import MergeRecipeError
from branchmerge.merge.methods import Method, register


@register
class ACM(Method):
    __doc__ = __doc__
    name = "acm"
    needs_base = True
    needs_activations = True
    model_params = {"weight": 1.0, "coef": None}
    global_params = {"lambda_": 1.0}

    def stats(self, ctx) -> list[float]:
        """w_i · c_i for this tensor (c_i already resolved to this tensor's layer)."""
        if any(c is None for c in ctx.p.coef):
            raise MergeRecipeError(
                f"acm: no coefficient for tensor '{ctx.name}': merge with calibration.files=[...] "
                "(merge.py's activation pass) or give `coef` per input"
            )
        return [w * c for w, c in zip(ctx.p.weight, ctx.p.coef)]

    def apply(self, ctx, scales, rows) -> torch.Tensor:
        base = rows.base()
        delta = torch.zeros_like(base)
        for i, s in enumerate(scales):
            delta.add_(rows.model(i).sub_(base), alpha=s)
        return base.add_(delta, alpha=ctx.p.lambda_)
