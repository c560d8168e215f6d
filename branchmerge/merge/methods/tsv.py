"""Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

For each weight matrix, with task vectors Δ_i = θ_i − B ∈ R^{m×n}, i = 1..N, and r = min(m, n):
    Δ_i ≈ U_i Σ_i V_iᵀ        the top k = max(1, ⌊r/N⌋) singular triplets of Δ_i (the paper keeps r/N)
    U = [U_1 … U_N]  (m × Nk),   Σ = diag(Σ_1 … Σ_N),   V = [V_1 … V_N]  (n × Nk)
    U⊥ = P Qᵀ  where U = P S Qᵀ (thin SVD): the matrix with orthonormal columns nearest to U
               (the polar factor; it decorrelates the tasks' singular vectors); V⊥ likewise
    W = B + λ · U⊥ Σ V⊥ᵀ                                        (λ: the paper's α)
Tensors that are not matrices (biases, norms) are merged as the authors' code merges them, by the
mean task vector: W = B + λ · (1/N) Σ_i Δ_i. So are, unless `svd_vocab`, the vocabulary matrices
(embed_tokens, lm_head): their rows are per-token lookups, not a linear map between hidden states, and
their SVD is the costliest of the model.

Memory: stats reads the whole matrix (an SVD needs it) and holds, in fp32, one Δ_i with its SVD and the
concatenated factors, about five copies of the matrix at peak (a 4864 × 896 MLP matrix: 17 MB each);
apply then writes rows of B + (λ U⊥Σ)[rows] · V⊥ᵀ block by block, on the executor's pool.
"""

from __future__ import annotations

import torch

from branchmerge.merge.methods import Method, register

VOCAB = ("embed", "lm_head")  # name parts of the vocabulary matrices


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD x = U diag(σ) Vᵀ. LAPACK's fp32 SVD (gesdd) can fail to converge on a matrix with
    hundreds of near-zero singular values, as Iso-CTS's projected task vectors are (an 896 × 896 one
    at 0.5B did): then it is redone in fp64."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        return tuple(t.to(x.dtype) for t in torch.linalg.svd(x.double(), full_matrices=False))


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal-column matrix nearest to x (m × k, m ≥ k): P Qᵀ from x = P S Qᵀ."""
    p, _, qh = svd(x)
    return p @ qh


def top(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of d: U (m × k), σ (k,), Vᵀ (k × n), copied out of the full SVD."""
    u, s, vh = svd(d)
    return u[:, :k].clone(), s[:k].clone(), vh[:k].clone()


class LowRankTaskVectors(Method):
    """Shared by the spectral methods: W = B + P[rows] · Q for a merged delta P Q (m × r, r × n) that
    `lowrank` computes from the task vectors of a whole matrix in stats; the mean task vector where
    the tensor is not a matrix, is a vocabulary matrix (unless svd_vocab), or holds a NaN/Inf (whose
    entries then reach the output through the mean, for the executor to name the input at fault)."""

    needs_base = True
    view = "matrix"

    def lowrank(self, ctx, delta, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.lowrank")

    def spectral(self, ctx) -> bool:
        vocab = any(part in ctx.name for part in VOCAB)
        return len(ctx.shape) == 2 and min(ctx.shape) > 0 and (ctx.p.svd_vocab or not vocab)

    def stats(self, ctx) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(λ·P, Q) in the compute dtype, or None for the mean task vector."""
        if not self.spectral(ctx):
            return None
        work = torch.float64 if ctx.dtype == torch.float64 else torch.float32  # LAPACK has no bf16
        finite = [True]

        def delta(i: int) -> torch.Tensor:  # Δ_i, whole (m × n), read from the stored tensors
            d = ctx.models[i].to(work, copy=True).sub_(ctx.base)
            finite[0] = finite[0] and bool(torch.isfinite(d).all())
            return d if finite[0] else torch.zeros_like(d)  # no SVD of NaN/Inf: the mean takes over

        p, q = self.lowrank(ctx, delta, len(ctx.models))
        if not finite[0]:
            return None
        return (ctx.p.lambda_ * p).to(ctx.dtype), q.to(ctx.dtype)

    def apply(self, ctx, lowrank, rows) -> torch.Tensor:
        base = rows.base()
        if lowrank is not None:
            p, q = lowrank
            return base.addmm_(p[rows.start : rows.stop], q)
        mean = rows.model(0)
        for i in range(1, len(ctx.models)):
            mean.add_(rows.stored(i))
        mean.div_(len(ctx.models)).sub_(base)
        return base.add_(mean, alpha=ctx.p.lambda_)


@register
class TSVMerge(LowRankTaskVectors):
    __doc__ = __doc__
    name = "tsv_m"
    global_params = {"lambda_": 1.0, "svd_vocab": False}

    def lowrank(self, ctx, delta, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U⊥Σ, V⊥ᵀ); one Δ_i in memory at a time."""
        k = max(1, min(ctx.shape) // n)
        us, ss, vhs = zip(*(top(delta(i), k) for i in range(n)))
        u, vh = polar(torch.cat(us, 1)), polar(torch.cat(vhs, 0).T).T
        return u * torch.cat(ss), vh
