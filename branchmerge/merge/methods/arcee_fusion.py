"""Arcee Fusion: what produced TinyR1-32B-Preview (mergekit `arcee_fusion`; docs/method.md, "The merge").

For base B and one other model R (a 1-D tensor is one row):
    Δ = R − B
    P = softmax(R, −1) + 1e-8,  Q = softmax(B, −1) + 1e-8            (row-wise)
    κ_r = Σ_j P_rj · log(P_rj / Q_rj)                                  (KL(P‖Q) per row, one log)
    S_rj = |Δ_rj| · κ_r                                                (importance)
    quartiles of S: q-quantile = sorted(x)[floor(q·(m−1))] over all m elements, or, when S has more
    than 10⁶ elements, over a uniform random subsample of 10⁶ (drawn with replacement, seeded); the
    median and the (Q1, Q3) pair come from two independent draws
    τ = median + k · (Q3 − Q1),  k = 1.5
    W = B + 1[S ≥ τ] ⊙ Δ
The code is what produced the paper's numbers, not its equations (whole-tensor KL, signed delta).
It is importance fusion with one expert and c = 1 (same stats, same apply, same bits).
"""

from __future__ import annotations

from branchmerge.merge.methods import register
from branchmerge.merge.methods.importance_fusion import ImportanceFusion


@register
class ArceeFusion(ImportanceFusion):
    __doc__ = __doc__
    name = "arcee_fusion"
    max_models = 1
    model_params = {}
