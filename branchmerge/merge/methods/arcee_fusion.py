"""Arcee Fusion: what produced TinyR1-32B-Preview (mergekit `arcee_fusion`; docs/method.md, "The merge").

For base B and one other model R (a 1-D tensor is one row):
    Δ = R − B
    P = softmax(R, −1) + 1e-8,  Q = softmax(B, −1) + 1e-8            (row-wise)
    κ_r = Σ_j P_rj · log(P_rj / Q_rj)                                  (KL(P‖Q) per row, one log)
    S_rj = |Δ_rj| · κ_r                                                (importance)
    quartiles of S: q-quantile = sorted(x)[floor(q·(m−1))] over all m elements, or, when S has more
    than 10⁶ elements, over a uniform random subsample of 10⁶ (drawn with replacement, seeded;
    see `Subsample`); the median and the (Q1, Q3) pair come from two independent draws
    τ = median + k · (Q3 − Q1),  k = 1.5
    W = B + 1[S ≥ τ] ⊙ Δ
The code is what produced the paper's numbers, not its equations (whole-tensor KL, signed delta).
Work is done in blocks of rows, cast from the stored dtype per block, so no temporary is ever full size:
S is never stored (its subsamples are taken while each block is in cache, and the mask pass
recomputes it from κ), which saves writing and re-reading 4 bytes per parameter.
Quantiles are exact selections by radix: a histogram of the top 16 bits of the values' order-preserving
integer keys finds the bucket that holds each wanted rank, a histogram of the low 16 bits within that
bucket finds the value itself (no sort).
"""

from __future__ import annotations

import numpy as np
import torch

from branchmerge.foundation import mix_seed
from branchmerge.merge.methods import Method, register
from branchmerge.merge.methods.blocks import map_blocks, run_all
from branchmerge.merge.methods.sparse import gather, kth_largest, tensor_seed

SAMPLE = 1_000_000
ROW_BLOCK_ELEMENTS = 1 << 18  # blocks of rows of about 1 MB in fp32: temporaries stay in cache


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(-1, t.shape[-1])


def _row_spans(rows: int, cols: int) -> list[tuple[int, int]]:
    """Blocks of whole rows of about ROW_BLOCK_ELEMENTS entries."""
    step = max(1, ROW_BLOCK_ELEMENTS // cols)
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def row_kl(r: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """κ per row of the 2-D views of r and b, in `dtype` (default b's), block by block of rows."""
    dtype = dtype or b.dtype
    r2, b2 = _rows(r), _rows(b)
    out = torch.empty(r2.shape[0], dtype=dtype, device=r.device)
    for i, j in _row_spans(*r2.shape):
        out[i:j] = _kl(r2[i:j].to(dtype), b2[i:j].to(dtype)).squeeze(-1)
    return out


def _kl(rr: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """κ = Σ_j P·log(P / Q) per row of a block (one log per entry instead of log P − log Q)."""
    p = torch.softmax(rr, dim=-1).add_(1e-8)
    q = torch.softmax(bb, dim=-1).add_(1e-8)
    return torch.div(p, q, out=q).log_().mul_(p).sum(-1, keepdim=True)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 values in the same order (negative floats have their magnitude bits
    flipped); the map is its own inverse."""
    bits = x.view(torch.int32)
    return torch.bitwise_right_shift(bits, 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def quantiles(values: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """sorted(values)[floor(q·(m−1))] for each q, exactly, by a two-level radix selection on 16-bit
    digits (float32; other dtypes select with `kth_largest`)."""
    flat = values.reshape(-1)
    m = flat.numel()
    ranks = [int(q * (m - 1)) for q in qs]  # 0-based, ascending
    if flat.dtype != torch.float32:
        return [kth_largest(flat, m - r) for r in ranks]
    keys = _order_keys(flat)
    top = torch.bitwise_right_shift(keys, 16).add_(32768)  # the high digit, shifted to [0, 65536)
    cum = torch.bincount(top, minlength=1 << 16).cumsum_(0)
    buckets = torch.searchsorted(cum, torch.tensor(ranks, device=cum.device), right=True).tolist()
    out = []
    for r, b in zip(ranks, buckets):
        rank_in_bucket = r - (int(cum[b - 1]) if b else 0)
        low = torch.bitwise_and(keys[top == b], 0xFFFF)
        cum_low = torch.bincount(low, minlength=1 << 16).cumsum_(0)
        c = int(torch.searchsorted(cum_low, torch.tensor([rank_in_bucket], device=cum.device), right=True))
        key = torch.tensor([((b - 32768) << 16) | c], dtype=torch.int32, device=flat.device)
        out.append(_order_keys(key.view(torch.float32)).view(torch.float32)[0])
    return out


class Subsample:
    """The two subsamples of S (each 10⁶ uniform draws with replacement over all of its entries)
    for a (rows × cols) tensor, drawn block by block of rows so that each block's values are taken
    while the block is in cache: how many draws land in each block is one multinomial draw (numpy,
    seeded by (seed, which)), their positions inside the block are uniform (torch.randint, seeded by
    (seed, which, block)). That is the distribution of 10⁶ independent uniform draws, and it never
    depends on threads or order."""

    def __init__(self, rows: int, cols: int, seed: int, dtype: torch.dtype, device) -> None:
        self.spans = _row_spans(rows, cols)
        sizes = np.array([(j - i) * cols for i, j in self.spans], dtype=np.float64)
        self.counts = [
            np.random.Generator(np.random.PCG64([seed, w])).multinomial(SAMPLE, sizes / sizes.sum())
            for w in (0, 1)
        ]
        self.starts = [np.cumsum(c) - c for c in self.counts]
        self.values = [torch.empty(SAMPLE, dtype=dtype, device=device) for _ in (0, 1)]
        self.cols, self.seed = cols, seed

    def offsets(self, which: int, block: int) -> torch.Tensor:
        """Positions (flat, inside block number `block`) of subsample `which`'s draws there."""
        i, j = self.spans[block]
        g = torch.Generator().manual_seed(mix_seed(self.seed, 2 * block + which + 1))
        return torch.randint((j - i) * self.cols, (int(self.counts[which][block]),), generator=g)

    def take(self, block: int, values: torch.Tensor) -> None:
        """Record the drawn entries of `values`, block number `block` of S (any shape)."""
        flat = values.reshape(-1)
        for w in (0, 1):
            start, count = int(self.starts[w][block]), int(self.counts[w][block])
            if count:
                self.values[w][start : start + count] = gather(flat, self.offsets(w, block))

    def indices(self, which: int) -> torch.Tensor:
        """Every flat index of subsample `which`, in the order its values are stored."""
        return torch.cat([self.offsets(which, b) + i * self.cols for b, (i, _) in enumerate(self.spans)])


def _tau_all(s: torch.Tensor, k: float) -> torch.Tensor:
    """τ = median + k·(Q3 − Q1) over every value of s (at most 10⁶ of them)."""
    q1, med, q3 = quantiles(s, [0.25, 0.5, 0.75])
    return med + k * (q3 - q1)


def _tau_from(sub: Subsample, k: float) -> torch.Tensor:
    """τ = median(first subsample) + k·(Q3 − Q1)(second subsample), the two selected in parallel."""
    (med,), (q1, q3) = run_all(
        [lambda: quantiles(sub.values[0], [0.5]), lambda: quantiles(sub.values[1], [0.25, 0.75])]
    )
    return med + k * (q3 - q1)


def importance_threshold(delta: torch.Tensor, kappa: torch.Tensor, k: float, seed: int) -> torch.Tensor:
    """τ for a materialised Δ and its rows' κ: median + k·IQR of S = |Δ|·κ, over all of S or over
    the two `Subsample`s when S has more than 10⁶ entries."""
    s = _rows(delta).abs() * kappa[:, None]
    if s.numel() <= SAMPLE:
        return _tau_all(s, k)
    sub = Subsample(*s.shape, seed, s.dtype, s.device)
    for block, (i, j) in enumerate(sub.spans):
        sub.take(block, s[i:j])
    return _tau_from(sub, k)


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
    """Two streaming passes over blocks of rows. First: κ per row, and S block by block, kept only
    at the subsamples' positions (or whole when S has at most 10⁶ entries). Then τ, then the mask
    pass recomputes S = |Δ|·κ per block (the same operations on the same values, so the same bits)
    and writes B + 1[S ≥ τ]·Δ in `out_dtype`. No full-size temporary besides the output."""
    (other,) = tensors
    dtype = dtype or base.dtype
    r2, b2 = _rows(other), _rows(base)
    rows, cols = b2.shape
    kappa = torch.empty(rows, 1, dtype=dtype, device=b2.device)
    small = b2.numel() <= SAMPLE
    s_all = torch.empty(b2.shape, dtype=dtype, device=b2.device) if small else None
    sub = None if small else Subsample(rows, cols, tensor_seed(seed, tensor_name, 0), dtype, b2.device)
    spans = sub.spans if sub else _row_spans(rows, cols)

    def first(block: int, _: int) -> None:
        i, j = spans[block]
        rr, bb = r2[i:j].to(dtype), b2[i:j].to(dtype)
        kappa[i:j] = _kl(rr, bb)
        if small:
            torch.sub(rr, bb, out=s_all[i:j]).abs_().mul_(kappa[i:j])
        else:
            sub.take(block, torch.sub(rr, bb).abs_().mul_(kappa[i:j]))

    map_blocks(first, [(b, b + 1) for b in range(len(spans))])
    tau = _tau_all(s_all, k) if small else _tau_from(sub, k)
    out = torch.empty(b2.shape, dtype=out_dtype or dtype, device=b2.device)

    def mask(i: int, j: int) -> None:
        bb = b2[i:j].to(dtype)
        d = r2[i:j].to(dtype, copy=True).sub_(bb)
        keep = torch.abs(d).mul_(kappa[i:j]) >= tau  # S ≥ τ
        torch.add(bb, d.mul_(keep), out=out[i:j])

    map_blocks(mask, spans)
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
