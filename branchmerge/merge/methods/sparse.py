"""Sparsified task arithmetic with optional sign consensus: TIES, DARE-linear and DARE-TIES are one
method configured three ways.

    Δ_i = θ_i − B
    sparsify   magnitude (TIES, Yadav et al. 2023, arXiv 2306.01708): keep the top `density` fraction
               of |Δ_i| (threshold = the k-th largest |Δ_i|, k = ceil(density·n)), zero the rest;
               random (DARE, Yu et al. 2024, arXiv 2311.03099): keep each entry with probability
               p = density (seeded), rescale kept entries by 1/p.
    consensus  sign (TIES): s = sign(Σ_i w_i Δ̂_i); keep only entries with sign(Δ̂_i) = s;
               none: keep all.
    W = B + λ · Σ_i w_i m_i Δ̂_i / D,   D = Σ_i w_i m_i (normalize; 1 where no model contributes)
                                       D = 1 (no normalize)
    where m_i marks the entries of model i kept by the consensus (nonzero after sparsification).
"""

from __future__ import annotations

import math
import zlib

import torch

from branchmerge.merge.methods import Method, register


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """True on the k = ceil(density·n) entries of largest |delta| (ties at the threshold kept)."""
    n = delta.numel()
    k = math.ceil(density * n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest, O(n), no sort
    return delta.abs() >= threshold


def random_mask(shape: torch.Size, density: float, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) < density


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A per-(tensor, model) seed: results do not depend on the order tensors are processed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + index) % (2**63)


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
    kept = []
    for i, (t, d) in enumerate(zip(tensors, density)):
        delta = t - base
        if not 0 <= d <= 1:
            raise ValueError(f"density must be in [0, 1], got {d}")
        if sparsify == "magnitude":
            delta = delta * magnitude_mask(delta, d)
        elif sparsify == "random":
            if d > 0:
                delta = delta * random_mask(delta.shape, d, tensor_seed(seed, tensor_name, i), delta.device)
                if rescale:
                    delta = delta / d
            else:
                delta = torch.zeros_like(delta)
        else:
            raise ValueError(f"sparsify must be 'magnitude' or 'random', got {sparsify!r}")
        kept.append(delta)
    weighted = torch.stack([w * d for w, d in zip(weight, kept)])
    if consensus == "sign":
        elected = torch.sign(weighted.sum(0))
        agree = (torch.sign(weighted) == elected) & (weighted != 0)
    elif consensus is None:
        agree = (
            torch.stack([d != 0 for d in kept]) if normalize else torch.ones_like(weighted, dtype=torch.bool)
        )
    else:
        raise ValueError(f"consensus must be 'sign' or null, got {consensus!r}")
    merged = (weighted * agree).sum(0)
    if normalize:
        w = torch.tensor(weight, dtype=base.dtype, device=base.device).view(-1, *[1] * base.dim())
        denom = (w * agree).sum(0)
        merged = merged / torch.where(denom == 0, torch.ones_like(denom), denom)
    return base + lambda_ * merged


_COMMON = dict(
    needs_base=True,
    takes_name=True,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"normalize": True, "lambda_": 1.0, "rescale": True, "seed": 0},
)
register(
    Method(
        "ties",
        sparse_task_arithmetic,
        fixed={"sparsify": "magnitude", "consensus": "sign"},
        doc=__doc__,
        **{**_COMMON, "global_params": {"normalize": True, "lambda_": 1.0}},
    )
)
register(
    Method(
        "dare_linear",
        sparse_task_arithmetic,
        fixed={"sparsify": "random", "consensus": None},
        doc=__doc__,
        **{**_COMMON, "global_params": {"normalize": False, "lambda_": 1.0, "rescale": True, "seed": 0}},
    )
)
register(
    Method(
        "dare_ties",
        sparse_task_arithmetic,
        fixed={"sparsify": "random", "consensus": "sign"},
        doc=__doc__,
        **_COMMON,
    )
)
