"""Fisher-weighted averaging (Matena & Raffel, 2022, arXiv 2111.09832).

    W = Σ_i w_i F_i ⊙ θ_i / Σ_i w_i F_i        (per coordinate; ε guards coordinates with no Fisher mass)
F_i is model i's diagonal Fisher: read from `fisher.safetensors` written by `train.py fisher.enabled=true`,
or estimated with `python -m branchmerge.merge.importance` over a calibration set.
Where Σ_i w_i F_i < ε the plain weighted average is used.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


def fisher_average(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    importance: list[torch.Tensor],
    eps: float = 1e-12,
) -> torch.Tensor:
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for t, w, f in zip(tensors, weight, importance):
        wf = w * f
        num.add_(wf * t)
        den.add_(wf)
    plain = sum(w * t for w, t in zip(weight, tensors)) / sum(weight)
    return torch.where(den > eps, num / den.clamp_min(eps), plain)


register(
    Method(
        "fisher",
        fisher_average,
        needs_base=False,
        min_models=2,
        model_params={"weight": 1.0},
        global_params={"eps": 1e-12},
        needs_importance=True,
        row_separable=True,
        doc=__doc__,
    )
)
