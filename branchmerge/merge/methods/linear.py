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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The sum in `dtype` (default: the first input's), returned in `out_dtype` (default `dtype`;
    rounded block by block); inputs may be stored narrower (bf16)."""
    total = sum(weight)
    if normalize and total == 0:
        raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
    scale = [w / total for w in weight] if normalize else list(weight)
    flat = [t.reshape(-1) for t in tensors]
    dtype = dtype or tensors[0].dtype
    out_dtype = out_dtype or dtype
    out = torch.empty(flat[0].numel(), dtype=out_dtype, device=tensors[0].device)
    # a 1-element tensor (not a Python scalar) makes bf16 · s compute in `dtype`: one cast-and-scale op
    s0 = torch.tensor([scale[0]], dtype=dtype, device=out.device)

    def block(a: int, z: int) -> None:  # one pass per input, in cache-sized blocks
        o = out[a:z] if out_dtype == dtype else None
        acc = torch.mul(flat[0][a:z], s0, out=o)
        for t, w in zip(flat[1:], scale[1:]):
            acc.add_(t[a:z], alpha=w)
        if o is None:
            out[a:z].copy_(acc)

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
        nonfinite_propagates=True,  # IEEE: NaN·w = NaN, Inf·0 = NaN, Inf·w = ±Inf, Inf + x ∈ {Inf, NaN}
        doc=__doc__,
    )
)
