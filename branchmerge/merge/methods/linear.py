"""Linear average / model soup (Wortsman et al., 2022, arXiv 2203.05482).

W = Σ_i w_i θ_i / Σ_i w_i        (normalize=true; otherwise W = Σ_i w_i θ_i)
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The sum in `dtype` (default: the first input's); inputs may be stored narrower (bf16)."""
    total = sum(weight)
    if normalize and total == 0:
        raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
    scale = [w / total for w in weight] if normalize else list(weight)
    out = tensors[0].to(dtype or tensors[0].dtype, copy=True).mul_(scale[0])  # one pass per input
    for t, w in zip(tensors[1:], scale[1:]):
        out.add_(t, alpha=w)
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
        casts_inputs=True,
        doc=__doc__,
    )
)
