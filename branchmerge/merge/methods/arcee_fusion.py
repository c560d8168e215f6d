"""Arcee Fusion: what produced TinyR1-32B-Preview (mergekit `arcee_fusion`; PAPER.md, "Merge").

For base B and one other model R (a 1-D tensor is one row):
    Δ = R − B
    P = softmax(R, −1) + 1e-8,  Q = softmax(B, −1) + 1e-8            (row-wise)
    κ_r = Σ_j P_rj · log(P_rj / Q_rj)                                  (KL(P‖Q) per row)
    S_rj = |Δ_rj| · κ_r                                                (importance)
    quartiles of S: q-quantile = sorted(x)[floor(q·(m−1))] over all m elements, or, when S has more
    than 10⁶ elements, over a uniform random subsample of 10⁶ (drawn with replacement from a seeded
    generator); the median and the (Q1, Q3) pair come from two independent draws
    τ = median + k · (Q3 − Q1),  k = 1.5
    W = B + 1[S ≥ τ] ⊙ Δ
The code is what produced the paper's numbers, not its equations (whole-tensor KL, signed delta).
Work is done in row blocks, so the temporaries stay a fraction of the tensor's size.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.sparse import tensor_seed

SAMPLE = 1_000_000
ROW_BLOCK_ELEMENTS = 1 << 22


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(-1, t.shape[-1])


def row_kl(r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """κ per row of the 2-D views of r and b (computed in blocks of rows)."""
    r2, b2 = _rows(r), _rows(b)
    out = torch.empty(r2.shape[0], dtype=r.dtype, device=r.device)
    step = max(1, ROW_BLOCK_ELEMENTS // r2.shape[1])
    for i in range(0, r2.shape[0], step):
        p = torch.softmax(r2[i : i + step], dim=-1) + 1e-8
        q = torch.softmax(b2[i : i + step], dim=-1) + 1e-8
        out[i : i + step] = (p * (p.log() - q.log())).sum(-1)
    return out


def quantiles(values: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """sorted(values)[floor(q·(m−1))] for each q (by selection: ~3x faster than sorting)."""
    flat = values.reshape(-1)
    m = flat.numel()
    return [torch.kthvalue(flat, int(q * (m - 1)) + 1).values for q in qs]


def importance_threshold(delta: torch.Tensor, kappa: torch.Tensor, k: float, seed: int) -> torch.Tensor:
    """τ = median + k·IQR of S = |Δ|·κ_row, on seeded subsamples when S has more than 10⁶ elements."""
    d2 = _rows(delta)
    n = d2.numel()
    if n <= SAMPLE:
        s = (d2.abs() * kappa[:, None]).reshape(-1)
        q1, med, q3 = quantiles(s, [0.25, 0.5, 0.75])
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        width = d2.shape[1]
        flat = d2.reshape(-1)

        def sample() -> torch.Tensor:
            idx = torch.randint(n, (SAMPLE,), generator=g).to(delta.device)
            return flat[idx].abs() * kappa[idx // width]

        (med,) = quantiles(sample(), [0.5])
        q1, q3 = quantiles(sample(), [0.25, 0.75])
    return med + k * (q3 - q1)


def arcee_fusion(
    tensors: list[torch.Tensor], base: torch.Tensor, *, k: float = 1.5, seed: int = 0, tensor_name: str = ""
) -> torch.Tensor:
    (other,) = tensors
    delta = other - base
    kappa = row_kl(other, base)
    tau = importance_threshold(delta, kappa, k, tensor_seed(seed, tensor_name, 0))
    out = base.clone()
    d2, o2 = _rows(delta), _rows(out)
    step = max(1, ROW_BLOCK_ELEMENTS // d2.shape[1])
    for i in range(0, d2.shape[0], step):
        block = d2[i : i + step]
        keep = block.abs() * kappa[i : i + step, None] >= tau
        o2[i : i + step] += block * keep
    return out


register(
    Method(
        "arcee_fusion",
        arcee_fusion,
        needs_base=True,
        min_models=1,
        max_models=1,
        global_params={"k": 1.5, "seed": 0},
        takes_name=True,
        doc=__doc__,
    )
)
