"""Sparsified task arithmetic with optional sign consensus: TIES, DARE-linear and DARE-TIES are one
method configured three ways.

    Δ_i = θ_i − B
    sparsify   magnitude (TIES, Yadav et al. 2023, arXiv 2306.01708): keep the k = ceil(density·n)
               entries of largest |Δ_i| (threshold = the k-th largest |Δ_i|, found exactly without a
               sort; ties at the threshold kept), zero the rest;
               random (DARE, Yu et al. 2024, arXiv 2311.03099): keep each entry with probability
               p = density (seeded per tensor, model and block of rows), rescale kept entries by 1/p.
    consensus  sign (TIES): s = sign(Σ_i w_i Δ̂_i); keep only entries with sign(Δ̂_i) = s;
               none: keep all.
    W = B + λ · Σ_i w_i m_i Δ̂_i / D,   D = Σ_i w_i m_i (normalize; 1 where no model contributes)
                                       D = 1 (no normalize)
    where m_i marks the entries of model i kept by the consensus (nonzero after sparsification).
Everything after the thresholds is element-wise, so it runs in blocks of rows: the temporaries stay
a small fraction of the tensor (the embedding of a 32B model is 778 M entries).
"""

from __future__ import annotations

import math
import zlib

import torch

from branchmerge.merge.methods import Method, register

BLOCK_ELEMENTS = 1 << 22
SAMPLE = 1 << 16


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(-1, t.shape[-1])


def kth_largest(values: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """The exact k-th largest of `values` (flattened) without sorting them: a small seeded sample
    brackets the answer, exact counts confirm the bracket, and only the bracket (about 2% of the
    entries) is selected on. Falls back to a full selection when the bracket misses."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n <= 16 * SAMPLE:
        return torch.kthvalue(flat, n - k + 1).values
    g = torch.Generator().manual_seed(seed)
    sample = flat[torch.randint(n, (SAMPLE,), generator=g).to(flat.device)]
    q = 1 - k / n  # the answer's quantile from below
    margin = 0.01
    while margin < 1:
        lo = torch.kthvalue(sample, max(1, int((q - margin) * SAMPLE))).values
        hi = torch.kthvalue(sample, min(SAMPLE, int((q + margin) * SAMPLE) + 1)).values
        above = int((flat > hi).sum())
        inside = flat[(flat >= lo) & (flat <= hi)]
        if above < k <= above + inside.numel():
            return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
        margin *= 4
    return torch.kthvalue(flat, n - k + 1).values


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A per-(tensor, model) seed: results do not depend on the order tensors are processed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + index) % (2**63)


def magnitude_threshold(t: torch.Tensor, base: torch.Tensor, density: float, seed: int) -> float | None:
    """|Δ| threshold keeping ceil(density·n) entries; None = keep all, +inf = keep none."""
    n = base.numel()
    k = math.ceil(density * n)
    if k >= n:
        return None
    if k <= 0:
        return math.inf
    return float(kth_largest((t - base).abs_(), k, seed))


def sparse_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    sparsify: str,
    consensus: str | None,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = True,
    seed: int = 0,
    tensor_name: str = "",
) -> torch.Tensor:
    for d in density:
        if not 0 <= d <= 1:
            raise ValueError(f"density must be in [0, 1], got {d}")
    if sparsify not in ("magnitude", "random"):
        raise ValueError(f"sparsify must be 'magnitude' or 'random', got {sparsify!r}")
    if consensus not in ("sign", None):
        raise ValueError(f"consensus must be 'sign' or null, got {consensus!r}")
    thresholds = [
        magnitude_threshold(t, base, d, tensor_seed(seed, tensor_name, i))
        if sparsify == "magnitude"
        else None
        for i, (t, d) in enumerate(zip(tensors, density))
    ]
    b2, t2 = _rows(base), [_rows(t) for t in tensors]
    out = torch.empty_like(b2)
    step = max(1, BLOCK_ELEMENTS // b2.shape[1])
    w = torch.tensor(weight, dtype=base.dtype, device=base.device).view(-1, 1, 1)
    for r0 in range(0, b2.shape[0], step):
        bb = b2[r0 : r0 + step]
        kept = []
        for i, (t, d) in enumerate(zip(t2, density)):
            delta = t[r0 : r0 + step] - bb
            if sparsify == "magnitude":
                if thresholds[i] is not None:
                    delta = delta * (delta.abs() >= thresholds[i])
            elif d == 0:
                delta = torch.zeros_like(delta)
            elif d < 1:
                g = torch.Generator(device=delta.device).manual_seed(
                    tensor_seed(seed, f"{tensor_name}#{r0}", i)
                )
                delta = delta * (torch.rand(delta.shape, generator=g, device=delta.device) < d)
                if rescale:
                    delta = delta / d
            kept.append(delta)
        weighted = torch.stack(kept) * w
        if consensus == "sign":
            agree = (torch.sign(weighted) == torch.sign(weighted.sum(0))) & (weighted != 0)
            merged = (weighted * agree).sum(0)
        else:
            agree = torch.stack(kept) != 0 if normalize else None
            merged = weighted.sum(0)
        if normalize:
            denom = (w * agree).sum(0)
            merged = merged / torch.where(denom == 0, torch.ones_like(denom), denom)
        out[r0 : r0 + step] = bb + lambda_ * merged
    return out.reshape(base.shape)


_COMMON = dict(needs_base=True, takes_name=True, model_params={"weight": 1.0, "density": 1.0})
register(
    Method(
        "ties",
        sparse_task_arithmetic,
        fixed={"sparsify": "magnitude", "consensus": "sign"},
        global_params={"normalize": True, "lambda_": 1.0},
        doc=__doc__,
        **_COMMON,
    )
)
register(
    Method(
        "dare_linear",
        sparse_task_arithmetic,
        fixed={"sparsify": "random", "consensus": None},
        global_params={"normalize": False, "lambda_": 1.0, "rescale": True, "seed": 0},
        doc=__doc__,
        **_COMMON,
    )
)
register(
    Method(
        "dare_ties",
        sparse_task_arithmetic,
        fixed={"sparsify": "random", "consensus": "sign"},
        global_params={"normalize": True, "lambda_": 1.0, "rescale": True, "seed": 0},
        doc=__doc__,
        **_COMMON,
    )
)
