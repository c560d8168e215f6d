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
Work is done in blocks of rows, cast from the stored dtype per block, so no temporary is ever full size.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.blocks import background, map_blocks, run_all
from branchmerge.merge.methods.sparse import kth_largest, tensor_seed

SAMPLE = 1_000_000
ROW_BLOCK_ELEMENTS = 1 << 18  # blocks of rows of about 1 MB in fp32: temporaries stay in cache


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(-1, t.shape[-1])


def _row_spans(t2: torch.Tensor):
    step = max(1, ROW_BLOCK_ELEMENTS // t2.shape[1])
    return ((i, min(i + step, t2.shape[0])) for i in range(0, t2.shape[0], step))


def row_kl(r: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """κ per row of the 2-D views of r and b, in `dtype` (default b's), block by block of rows."""
    dtype = dtype or b.dtype
    r2, b2 = _rows(r), _rows(b)
    out = torch.empty(r2.shape[0], dtype=dtype, device=r.device)
    for i, j in _row_spans(r2):
        p = torch.softmax(r2[i:j].to(dtype), dim=-1).add_(1e-8)
        q = torch.softmax(b2[i:j].to(dtype), dim=-1).add_(1e-8)
        out[i:j] = p.log().sub_(q.log_()).mul_(p).sum(-1)  # Σ P·(log P − log Q)
    return out


def quantiles(values: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """sorted(values)[floor(q·(m−1))] for each q: the (m − floor(q·(m−1)))-th largest, selected
    exactly without sorting (`kth_largest`: 7x faster than kthvalue on 10⁶ values)."""
    flat = values.reshape(-1)
    m = flat.numel()
    return [kth_largest(flat, m - int(q * (m - 1))) for q in qs]


def _importance(r2: torch.Tensor, b2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """S = |R − B| · κ_row for the 2-D views, in one block-parallel pass over blocks of rows (κ as
    `row_kl`)."""
    s = torch.empty(b2.shape, dtype=dtype, device=b2.device)

    def block(i: int, j: int) -> None:
        rr, bb = r2[i:j].to(dtype), b2[i:j].to(dtype)
        p = torch.softmax(rr, dim=-1).add_(1e-8)
        q = torch.softmax(bb, dim=-1).add_(1e-8)
        kappa = p.log().sub_(q.log_()).mul_(p).sum(-1, keepdim=True)
        torch.sub(rr, bb, out=s[i:j]).abs_().mul_(kappa)

    map_blocks(block, _row_spans(b2))
    return s


def _draws(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two subsamples' indices: 10⁶ uniform draws with replacement each, from one seeded stream."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(n, (SAMPLE,), generator=g), torch.randint(n, (SAMPLE,), generator=g)


def _tau(s: torch.Tensor, k: float, seed: int, draws: Future | None = None) -> torch.Tensor:
    """τ = median + k·IQR of the values s (flat), on two seeded subsamples of 10⁶ (drawn with
    replacement; the median from the first, the quartiles from the second) when there are more.
    `draws`: `_draws(n, seed)` already started in the background. The three selections run in parallel."""
    n = s.numel()
    if n <= SAMPLE:
        q1, med, q3 = run_all([lambda q=q: quantiles(s, [q])[0] for q in (0.25, 0.5, 0.75)])
    else:
        i1, i2 = draws.result() if draws is not None else _draws(n, seed)

        def on_sample(idx: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
            return quantiles(s.index_select(0, idx.to(s.device)), qs)  # random gathers: latency-bound

        (med,), (q1, q3) = run_all([lambda: on_sample(i1, [0.5]), lambda: on_sample(i2, [0.25, 0.75])])
    return med + k * (q3 - q1)


def importance_threshold(delta: torch.Tensor, kappa: torch.Tensor, k: float, seed: int) -> torch.Tensor:
    """τ for a materialised Δ and its rows' κ (see `_tau`)."""
    return _tau((_rows(delta).abs() * kappa[:, None]).reshape(-1), k, seed)


def arcee_fusion(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    k: float = 1.5,
    seed: int = 0,
    tensor_name: str = "",
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Two streaming passes over blocks of rows: S (and κ), then the mask, written over S in place
    (the only full-size temporary is S, which becomes the output unless `out_dtype` differs from
    `dtype`)."""
    (other,) = tensors
    dtype = dtype or base.dtype
    r2, b2 = _rows(other), _rows(base)
    n, seed = b2.numel(), tensor_seed(seed, tensor_name, 0)
    draws = background(_draws, n, seed) if n > SAMPLE else None  # overlaps the first pass
    s = _importance(r2, b2, dtype)
    tau = _tau(s.reshape(-1), k, seed, draws)
    out = s if out_dtype in (None, dtype) else torch.empty(b2.shape, dtype=out_dtype, device=b2.device)

    def block(i: int, j: int) -> None:
        bb = b2[i:j].to(dtype)
        d = r2[i:j].to(dtype, copy=True).sub_(bb)
        keep = s[i:j] >= tau  # S ≥ τ
        torch.add(bb, d.mul_(keep), out=out[i:j])

    map_blocks(block, _row_spans(b2))
    return out.reshape(base.shape)


register(
    Method(
        "arcee_fusion",
        arcee_fusion,
        needs_base=True,
        min_models=1,
        max_models=1,
        global_params={"k": 1.5, "seed": 0},
        takes_name=True,
        casts_inputs=True,
        nonfinite_propagates=True,  # a NaN/Inf entry of R or B makes Δ (and B + mask·Δ) NaN/Inf there
        doc=__doc__,
    )
)
