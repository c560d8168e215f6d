"""TIES' magnitude trim keeps exactly mergekit's k entries, ties at the threshold broken by position,
and its sign election sends a zero sum to + as mergekit's does."""

from __future__ import annotations

import pytest
import torch

from branchmerge.merge.methods import get_method
from branchmerge.merge.methods.select import SMALL


def _reference_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The rule, densely: k = max(1, floor(density·n)); the first k of a stable descending sort of |Δ|
    (so among equal magnitudes the lower flat index wins)."""
    flat = delta.reshape(-1).float().abs()
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, order, True).reshape(delta.shape)


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
