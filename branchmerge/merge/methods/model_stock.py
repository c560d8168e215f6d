"""Model Stock (Jang et al., 2024, arXiv 2403.19522), as mergekit's `model_stock` computes it.

For base B and N ≥ 2 fine-tuned models θ_i, Δ_i = θ_i − B (whole flattened tensors, or each row
when filter_wise):
    cos θ = mean_{i<j} clamp(⟨Δ_i, Δ_j⟩ / max(‖Δ_i‖‖Δ_j‖, 1e-6), −1, 1)
    t = N cos θ / (1 + (N − 1) cos θ)
    W = t · (1/N) Σ_i θ_i + (1 − t) · B
stats: the inner products and norms (float64, block by block) and t; apply: the interpolation.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register


@register
class ModelStock(Method):
    __doc__ = __doc__
    name = "model_stock"
    needs_base = True
    min_models = 2
    view = "matrix"  # rows, for filter_wise
    global_params = {"filter_wise": False}

    def stats(self, ctx) -> torch.Tensor:
        """t as a column: (rows, 1) when filter_wise, else (1, 1)."""
        n = len(ctx.models)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

        # (pairs + n, rows): ⟨Δ_i, Δ_j⟩ per pair, then ‖Δ_i‖². Blocks write their columns into one
        # buffer made up front: per-block results kept until a concatenation would each pin the heap
        # hole of their block's float64 copies, growing the heap by a block per block.
        prods = torch.empty(len(pairs) + n, ctx.n_rows, dtype=torch.float64, device=ctx.models[0].device)

        def products(rows) -> None:
            base = rows.base().double()
            d = [rows.model(i).double().sub_(base) for i in range(n)]
            col = prods[:, rows.start : rows.stop]
            for k, (i, j) in enumerate(pairs):
                torch.sum(d[i] * d[j], -1, out=col[k])
            for k, x in enumerate(d, start=len(pairs)):
                torch.sum(x * x, -1, out=col[k])

        ctx.map(products)
        if not ctx.p.filter_wise:
            prods = prods.sum(1, keepdim=True)
        norms = prods[len(pairs) :].sqrt()
        cos = torch.stack(
            [
                (prods[k] / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1, 1)
                for k, (i, j) in enumerate(pairs)
            ]
        ).mean(0)
        return (n * cos / (1 + (n - 1) * cos)).to(ctx.dtype).unsqueeze(-1)

    def apply(self, ctx, t, rows) -> torch.Tensor:
        t = t[rows.start : rows.stop] if ctx.p.filter_wise else t
        mean = sum(rows.model(i) for i in range(len(ctx.models))) / len(ctx.models)
        return t * mean + (1 - t) * rows.base()
