"""N-model importance-weighted fusion: Arcee Fusion generalised to any number of experts (our own).

For base B and experts θ_1..θ_N with coefficients c_i:
    Δ_i = θ_i − B,  S_i = |Δ_i| · κ_i,row   (κ_i = row-wise KL(softmax θ_i ‖ softmax B), as Arcee Fusion)
    M_i = 1[S_i ≥ τ_i],  τ_i = median(S_i) + k · IQR(S_i)   (same seeded quartile rule)
    W = B + Σ_i c_i M_i Δ_i / max(1, Σ_i M_i)
Why: the paper merges pairwise, so the result depends on the order ((math ⊕ science) ⊕ code and
(math ⊕ code) ⊕ science differ in Table 2), and the second step measures importance against a merge
rather than against the base. Here every expert is scored against the same base in one step; a
coordinate claimed by one expert takes that expert's change (as Arcee Fusion), one claimed by several
takes the mean of their changes (no double counting), and c_i scales expert i (c_i = 1 keeps the
changes at full size). With one expert and c = 1 this is exactly Arcee Fusion.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.arcee_fusion import _rows, importance_threshold, row_kl
from branchmerge.merge.methods.sparse import tensor_seed


def importance_fusion(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    k: float = 1.5,
    seed: int = 0,
    tensor_name: str = "",
) -> torch.Tensor:
    total = torch.zeros_like(base)
    claims = torch.zeros_like(base)
    for i, (t, c) in enumerate(zip(tensors, weight)):
        delta = t - base
        kappa = row_kl(t, base)
        tau = importance_threshold(delta, kappa, k, tensor_seed(seed, tensor_name, i))
        mask = (_rows(delta).abs() * kappa[:, None] >= tau).reshape(base.shape)
        total.add_(c * delta * mask)
        claims.add_(mask.to(base.dtype))
    return base + total / claims.clamp_min(1)


register(
    Method(
        "importance_fusion",
        importance_fusion,
        needs_base=True,
        min_models=1,
        model_params={"weight": 1.0},
        global_params={"k": 1.5, "seed": 0},
        takes_name=True,
        doc=__doc__,
    )
)
