"""Linear average / model soup (Wortsman et al., 2022, arXiv 2203.05482).

W = Σ_i w_i θ_i / Σ_i w_i        (normalize=true; otherwise W = Σ_i w_i θ_i)
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.blocks import map_blocks, spans


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
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(flat[0].numel(), dtype=dtype or tensors[0].dtype, device=tensors[0].device)

    def block(a: int, z: int) -> None:  # one pass per input, in cache-sized blocks
        o = out[a:z]
        o.copy_(flat[0][a:z]).mul_(scale[0])  # cast first: bf16 · scalar would round in bf16
        for t, w in zip(flat[1:], scale[1:]):
            o.add_(t[a:z], alpha=w)

    map_blocks(block, spans(out.numel()))
    return out.reshape(tensors[0].shape)


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
