"""The exact-count tie rule: TIES' trim, Breadcrumbs' band and SCE's variance selection keep exactly
as many entries as mergekit (TIES k = max(1, ⌊density·n⌋); Breadcrumbs t = ⌊density·n⌋ after dropping
⌊γ·n⌋ largest; SCE k = ⌊select_topk·#{Var ≠ 0}⌋), a run of equal values cut by a boundary split by flat
position (the stable descending order), the same on one block as over several. TIES' sign election
sends a zero sum to + as mergekit's does."""

from __future__ import annotations

import pytest
import torch

from branchmerge.merge.methods import get_method
from branchmerge.merge.methods.select import SMALL


def _window(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The rule, densely: the entries at positions [lo, hi) of a stable descending sort of the values
    (so among equal values the lower flat index ranks first)."""
    flat = values.reshape(-1).float()
    order = torch.sort(flat, descending=True, stable=True).indices[lo:hi]
    return torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, order, True).reshape(values.shape)


def _reference_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES: k = max(1, floor(density·n)), the window [0, k) of |Δ|."""
    return _window(delta.abs(), 0, max(1, int(density * delta.numel())))


def _tied_deltas(shape, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Deltas from 9 magnitudes (0, ±0.25 … ±1): every cut falls inside a run of thousands of ties."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, shape, generator=g).float() * 0.25).to(dtype)


def _trimmed(delta: torch.Tensor, density: float, dtype=torch.float32) -> torch.Tensor:
    """One model through TIES (weight 1, no normalisation): B + trim(Δ) with B = 0."""
    base = torch.zeros_like(delta)
    return get_method("ties")([delta], base, dtype=dtype, weight=[1.0], density=[density], normalize=False)


@pytest.mark.parametrize("shape", [(64, 40), (900, 700)], ids=["small", "streamed"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_exactly_k_kept_with_ties_broken_by_position(shape, density):
    """Deltas drawn from 9 magnitudes tie by the thousands at the threshold. Guards against keeping
    every tied entry (`|Δ| >= t`, the old rule: ~5-50% too many kept here) and against a per-block
    tie budget that ignores earlier blocks (the 900×700 tensor spans 3 blocks and the bracketed
    selection path, the 64×40 one the whole-tensor path)."""
    assert (shape[0] * shape[1] > SMALL) == (shape[0] > 64)
    g = torch.Generator().manual_seed(2)
    delta = (torch.randint(-4, 5, shape, generator=g).float() * 0.25).bfloat16()
    out = _trimmed(delta, density)
    want = _reference_keep(delta, density)
    kept = out != 0
    assert int(kept.sum()) == int((want & (delta != 0)).sum())
    assert torch.equal(kept, want & (delta != 0))
    assert torch.equal(out[kept], delta.float()[kept])


def test_bf16_compute_keeps_k_too():
    """In bf16 compute (mergekit's `dtype: bfloat16`) the deltas themselves are bf16: still exactly k."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 1000, generator=g).bfloat16()
    model = (base.float() + 0.01 * torch.randn(300, 1000, generator=g)).bfloat16()
    out = get_method("ties")(
        [model], base, dtype=torch.bfloat16, weight=[1.0], density=[0.3], normalize=False
    )
    delta = model - base  # bf16 arithmetic, as the executor's compute dtype
    want = _reference_keep(delta, 0.3)
    assert torch.equal(out != base, want & (delta != 0))


def test_zero_sum_elects_the_positive_sign():
    """Δ1 = +1, Δ2 = −1 at one entry: the sum is 0, mergekit elects + and keeps Δ1 (normalised by its
    weight: 1). Guards against `sign(Σ)` = 0 keeping neither (the old rule gave 0 there)."""
    d1 = torch.tensor([[1.0, 2.0, -3.0]])
    d2 = torch.tensor([[-1.0, 2.0, 1.0]])
    out = get_method("ties")([d1, d2], torch.zeros(1, 3), weight=[1.0, 1.0], density=[1.0, 1.0])
    assert torch.equal(out, torch.tensor([[1.0, 2.0, -3.0]]))


SHAPES = pytest.mark.parametrize("shape", [(64, 40), (900, 700)], ids=["one_block", "three_blocks"])


def _band(n: int, density: float, gamma: float) -> tuple[int, int]:
    """mergekit's Breadcrumbs window as descending ranks: t = ⌊density·n⌋ kept after the ⌊γ·n⌋ largest,
    b = max(0, n − t − ⌊γ·n⌋) smallest dropped, so ranks [n − b − t, n − b)."""
    t, top = int(density * n), int(gamma * n)
    bottom = max(0, n - t - top)
    return n - bottom - t, n - bottom


@SHAPES
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.02), (0.8, 0.3)])
def test_breadcrumbs_keeps_mergekits_count_ties_split_by_position(shape, density, gamma):
    """One model, B = 0: W = the kept Δ. Both ends of the band cut runs of tied |Δ| (9 magnitudes);
    exactly t = ⌊density·n⌋ ranks are kept, the same ones as a full stable sort, on one block and across
    3 blocks (the bracketed selection with per-block tie counts). 0.8 + 0.3 > 1: fewer than ⌊γ·n⌋ are
    dropped from the top. Guards against the old band lo ≤ |Δ| ≤ hi, which kept every entry tied with
    either threshold (planted: 1 to 126 000 entries too many, every case fails)."""
    delta = _tied_deltas(shape, 11)
    n = delta.numel()
    lo, hi = _band(n, density, gamma)
    want = _window(delta.abs(), lo, hi)
    assert int(want.sum()) == int(density * n)
    out = get_method("breadcrumbs")(
        [delta], torch.zeros_like(delta), dtype=torch.float32, density=[density], gamma=[gamma]
    )
    assert torch.equal(out != 0, want & (delta != 0))
    assert torch.equal(out[want], delta.float()[want])


@SHAPES
def test_breadcrumbs_ties_elects_over_the_exact_bands(shape):
    """Two models with tied deltas, sign election and normalisation: the output is the dense reference
    built from each model's exact window (values are multiples of 1/4, so sums are exact). Guards
    against a band that keeps every tie (planted: entries kept outside the window change the election
    and the divisor) and a second model's window drawn from the first model's ranks."""
    d1, d2 = _tied_deltas(shape, 12), _tied_deltas(shape, 13)
    p = dict(density=[0.4, 0.6], gamma=[0.05, 0.1], weight=[1.0, 1.0])
    out = get_method("breadcrumbs_ties")(
        [d1, d2], torch.zeros_like(d1), dtype=torch.float32, normalize=True, **p
    )
    n = d1.numel()
    ds = [
        d.float() * _window(d.abs(), *_band(n, dn, g)) for d, dn, g in zip((d1, d2), p["density"], p["gamma"])
    ]
    elected = torch.where(ds[0] + ds[1] >= 0, 1.0, -1.0)
    agree = [d.sign() == elected for d in ds]
    den = (agree[0].float() + agree[1].float()).clamp_min(1.0)
    assert torch.equal(out, (ds[0] * agree[0] + ds[1] * agree[1]) / den)


def _sce_selected(taus: list[torch.Tensor], topk: float) -> torch.Tensor:
    """mergekit's SCE selection count with our order: Var as torch.var computes it in the τ's dtype,
    k = ⌊topk · #{Var ≠ 0}⌋, the window [0, k) of Var."""
    var = torch.var(torch.stack(taus), dim=0, unbiased=False)
    return _window(var, 0, int(int(torch.count_nonzero(var)) * topk))


@SHAPES
@pytest.mark.parametrize("topk", [0.2, 0.55])
def test_sce_selects_exactly_k_by_variance_ties_split_by_position(shape, topk):
    """τ2 = 0: Var = τ1²/4 ties in runs of thousands (5 magnitudes), and W = B + τ1 exactly on the
    selected entries (η = (1, 0)), B elsewhere. Exactly k = ⌊topk·#{Var ≠ 0}⌋ entries are selected, the
    first ones in flat order among those tied at the cut, on one block and across 3. Guards against
    keeping every entry tied with the k-th largest variance (the old `Var ≥ t`; planted:
    150 to 111 730 entries too many, every case fails)."""
    t1 = _tied_deltas(shape, 14, torch.float32)
    base = torch.zeros_like(t1)
    want = _sce_selected([t1, torch.zeros_like(t1)], topk)
    assert int(want.sum()) == int(int(torch.count_nonzero(t1)) * topk)
    out = get_method("sce")([t1, base], base, select_topk=topk)
    assert torch.equal(out, t1 * want)


@pytest.mark.parametrize("shape", [(64, 40), (700, 500)], ids=["one_block", "two_blocks"])
def test_sce_in_bf16_compute_selects_on_torch_var_in_bf16(shape):
    """`dtype: bfloat16`: mergekit's variance is torch.var of the bf16 τ, the exact variance rounded
    once to bf16 (it ties a lot); we select the same k entries of it (B = 0, so W ≠ 0 exactly where
    selected). Guards against a variance computed with bf16 arithmetic step by step (the old
    `variance`: a different value on ~1 entry in 3; planted: the selection moves and fails)."""
    g = torch.Generator().manual_seed(15)
    models = [(0.05 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    base = torch.zeros(shape, dtype=torch.bfloat16)
    out = get_method("sce")(models, base, dtype=torch.bfloat16, select_topk=0.3)
    assert torch.equal(out != 0, _sce_selected(models, 0.3))


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "sce"])
def test_fp32_checkpoints_in_bf16_compute_rank_the_rounded_deltas(name):
    """fp32-stored inputs, bf16 compute: mergekit rounds θ and B to bf16, then subtracts. Ranks and
    masks use that same Δ in stats and apply, so the counts stay exact. Guards against the stats
    subtracting the stored fp32 base from the bf16 θ (one rounding instead of two: planted, TIES and
    Breadcrumbs keep a different number than k, SCE selects other entries)."""
    g = torch.Generator().manual_seed(16)
    base = torch.randn(300, 1000, generator=g)
    models = [base + 0.01 * torch.randn(300, 1000, generator=g) for _ in range(2)]
    bf = [m.bfloat16() for m in models]
    deltas = [m - base.bfloat16() for m in bf]  # bf16 arithmetic on rounded inputs, as mergekit
    method = get_method(name)
    if name == "sce":
        out = method(models, base, dtype=torch.bfloat16, select_topk=0.4)
        assert torch.equal(out != base.bfloat16(), _sce_selected(deltas, 0.4))
        return
    p = (
        {"density": [0.3], "gamma": [0.1]}
        if name == "breadcrumbs"
        else {"density": [0.3], "normalize": False}
    )
    out = method(models[:1], base, dtype=torch.bfloat16, **p)
    lo, hi = _band(base.numel(), 0.3, 0.1) if name == "breadcrumbs" else (0, int(0.3 * base.numel()))
    assert torch.equal(out != base.bfloat16(), _window(deltas[0].abs(), lo, hi) & (deltas[0] != 0))
