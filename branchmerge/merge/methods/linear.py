"""Linear average / model soup (Wortsman et al., 2022, arXiv 2203.05482).

W = Σ_i w_i θ_i / Σ_i w_i        (normalize=true; otherwise W = Σ_i w_i θ_i)
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


def linear(
    tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool = True
) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weight):
        out.add_(t, alpha=w)
    total = sum(weight)
    if normalize:
        if total == 0:
            raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
        out.div_(total)
    return out


register(
    Method(
        "linear",
        linear,
        needs_base=False,
        min_models=1,
        model_params={"weight": 1.0},
        global_params={"normalize": True},
        row_separable=True,
        doc=__doc__,
    )
)
