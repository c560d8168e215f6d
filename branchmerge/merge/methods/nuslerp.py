"""NuSLERP: spherical interpolation of two models (or of their task vectors), over the whole tensor,
each row or each column (mergekit's `nuslerp`).

    x_j = θ_j − B with a base, else θ_j (j = 0, 1);  t = w_1 / (w_0 + w_1)  (0.5 when |w_0 + w_1| < 1e-6)
    for each vector pair (a, b) of x_0, x_1:
        cos Ω = ⟨a/max(‖a‖, 1e-7), b/max(‖b‖, 1e-7)⟩ clamped to [−1, 1]
        slerp = (sin((1−t)Ω) a + sin(tΩ) b) / sin Ω;  (1−t) a + t b where 1 − cos²Ω ≤ 1e-16
    W = B + slerp (or slerp)
    vectors: the whole flattened tensor (nuslerp_flatten, the default; also any 1-D tensor), else
    the columns of a matrix (nuslerp_row_wise: mergekit slerps along dim 0) or its rows (the last dim).

Parameters: per model `weight` 1.0; `nuslerp_flatten` true, `nuslerp_row_wise` false.
stats: ‖a‖², ‖b‖², ⟨a, b⟩ as float64 sums (whole tensor or per column, by block) → the two
coefficients; apply: a·c_a + b·c_b (per-row sums are taken inside the block).
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


def coefficients(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor, t: float):
    """(c_a, c_b) from the sums (any matching shapes, float64)."""
    cos = (ab / (aa.sqrt().clamp_min(1e-7) * bb.sqrt().clamp_min(1e-7))).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    omega = torch.arccos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(omega)
    ca = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * omega) / s)
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * omega) / s)
    return ca, cb


def pair(ctx, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0, x_1 of one block, in the compute dtype."""
    a, b = rows.model(0), rows.model(1)
    if ctx.base is not None:
        base = rows.stored_base()
        a.sub_(base)
        b.sub_(base)
    return a, b


def sums(a: torch.Tensor, b: torch.Tensor, dim: int | None) -> list[torch.Tensor]:
    kw = {"dtype": torch.float64} if dim is None else {"dim": dim, "keepdim": True, "dtype": torch.float64}
    return [(a * a).sum(**kw), (b * b).sum(**kw), (a * b).sum(**kw)]


@register
class NuSlerp(Method):
    __doc__ = __doc__
    name = "nuslerp"
    min_models = max_models = 2
    view = "matrix"
    model_params = {"weight": 1.0}
    global_params = {"nuslerp_flatten": True, "nuslerp_row_wise": False}

    def mode(self, ctx) -> str:
        if ctx.p.nuslerp_flatten or len(ctx.shape) <= 1:
            return "tensor"
        if not ctx.p.nuslerp_row_wise:
            return "row"
        if len(ctx.shape) > 2:
            raise ValueError(
                f"nuslerp: '{ctx.name}' has {len(ctx.shape)} dims; nuslerp_row_wise takes matrices only "
                "(set nuslerp_flatten: true)"
            )
        return "column"

    def stats(self, ctx):
        """(t, coefficients): scalars (whole tensor), (1, cols) (columns) or None (rows: in apply)."""
        w0, w1 = ctx.p.weight
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        mode = self.mode(ctx)
        if mode == "row":
            return t, None
        dim = None if mode == "tensor" else 0
        return t, coefficients(*ctx.map_sum(lambda rows: torch.stack(sums(*pair(ctx, rows), dim))), t)

    def apply(self, ctx, stats, rows) -> torch.Tensor:
        t, coef = stats
        a, b = pair(ctx, rows)
        ca, cb = coefficients(*sums(a, b, -1), t) if coef is None else coef
        out = a.mul_(ca.to(a.dtype)).add_(b.mul_(cb.to(b.dtype)))
        return out.add_(rows.stored_base()) if ctx.base is not None else out
