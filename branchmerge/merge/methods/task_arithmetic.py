"""Task arithmetic (Ilharco et al., 2023, arXiv 2212.04089).

Δ_i = θ_i − B,    W = B + λ Σ_i w_i Δ_i
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


def task_arithmetic(
    tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], lambda_: float = 1.0
) -> torch.Tensor:
    delta = torch.zeros_like(base)
    for t, w in zip(tensors, weight):
        delta.add_(t - base, alpha=w)
    return base + lambda_ * delta


register(
    Method(
        "task_arithmetic",
        task_arithmetic,
        needs_base=True,
        model_params={"weight": 1.0},
        global_params={"lambda_": 1.0},
        row_separable=True,
        doc=__doc__,
    )
)
