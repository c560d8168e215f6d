"""Spherical linear interpolation of two models (Shoemake, 1985; as used for LLM merging).

a, b = the two models' tensors, t in [0, 1] (a list of t values is interpolated over layer depth)
    Ω = arccos(⟨a/‖a‖, b/‖b‖⟩)
    W = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b        (linear interpolation when sin Ω ≈ 0)
The norms and the dot product are whole-tensor sums, taken in float64 block by block (stats).
"""

from __future__ import annotations

import math

import torch

from branchmerge.merge.methods import Method, register

EPS = 1e-8


@register
class Slerp(Method):
    __doc__ = __doc__
    name = "slerp"
    min_models = max_models = 2
    global_params = {"t": 0.5}

    def stats(self, ctx) -> tuple[float, float]:
        """(c_a, c_b): the coefficients of a and b."""
        t = ctx.p.t

        def sums(rows) -> torch.Tensor:
            a, b = rows.stored(0).double(), rows.stored(1).double()
            return torch.stack([a @ a, b @ b, a @ b])

        aa, bb, ab = ctx.map_sum(sums).tolist()
        na, nb = math.sqrt(aa), math.sqrt(bb)
        if na < EPS or nb < EPS:
            return 1 - t, t
        omega = math.acos(min(1.0, max(-1.0, ab / (na * nb))))
        if abs(math.sin(omega)) < 1e-6:  # (anti)parallel: the sphere degenerates to a line
            return 1 - t, t
        return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)

    def apply(self, ctx, coef, rows) -> torch.Tensor:
        ca, cb = coef
        return ca * rows.model(0) + cb * rows.model(1)
