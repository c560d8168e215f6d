"""Spherical linear interpolation of two models (Shoemake, 1985; as used for LLM merging).

a, b = the two models' tensors, t in [0, 1] (a list of t values is interpolated over layer depth)
Ω = arccos(⟨a/‖a‖, b/‖b‖⟩)
W = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b        (linear interpolation when sin Ω ≈ 0)
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


def slerp(
    tensors: list[torch.Tensor], base: torch.Tensor | None, *, t: float, eps: float = 1e-8
) -> torch.Tensor:
    a, b = tensors
    af, bf = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = af.norm(), bf.norm()
    if na < eps or nb < eps:
        return (1 - t) * a + t * b
    dot = torch.clamp((af / na) @ (bf / nb), -1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    if so.abs() < 1e-6:  # (anti)parallel: the sphere degenerates to a line
        return (1 - t) * a + t * b
    ca = float(torch.sin((1 - t) * omega) / so)
    cb = float(torch.sin(t * omega) / so)
    return ca * a + cb * b


register(
    Method(
        "slerp", slerp, needs_base=False, min_models=2, max_models=2, global_params={"t": 0.5}, doc=__doc__
    )
)
