"""The chunked SFT loss equals the full cross-entropy, and its memory peak is a small part of it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from branchmerge.lm_loss import chunked_token_loss_sum, token_loss_sum


def _inputs(b=2, length=37, h=16, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[:, :5] = -100  # a prompt
    labels[1, -7:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(chunk):
    """Bug guarded: a chunk boundary that drops or double-counts a position, a missing shift, or a
    label mask applied to the wrong side all change the loss or the gradients."""
    hidden, weight, labels = _inputs()
    full = token_loss_sum(hidden @ weight.T, labels)
    gh, gw = torch.autograd.grad(full, (hidden, weight))
    part = chunked_token_loss_sum(hidden, weight, labels, chunk)
    ch, cw = torch.autograd.grad(part, (hidden, weight))
    assert abs(float(full - part)) <= 1e-5 * abs(float(full))
    assert torch.allclose(gh, ch, rtol=1e-5, atol=1e-8) and torch.allclose(gw, cw, rtol=1e-5, atol=1e-8)


_PEAK = textwrap.dedent(
    """
    import sys, torch
    from branchmerge.lm_loss import chunked_token_loss_sum
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    L, H, V, chunk = 2048, 64, 152064, int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, L, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (1, L), generator=g)
    before = hwm()
    loss = chunked_token_loss_sum(hidden, weight, labels, chunk)
    loss.backward()
    print(hwm() - before, float(loss), file=sys.stdout)
    """
)


def _peak(chunk: int) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(chunk)], capture_output=True, text=True, check=True
    )
    growth, loss = out.stdout.split()
    return int(growth), float(loss)


@pytest.mark.slow
def test_chunked_loss_peak_is_a_small_fraction_of_full_logits():
    """A 2048-token row over Qwen's 152,064-row vocabulary: full fp32 logits are 1.25 GB (and their
    gradient as much again). Bug guarded: computing the logits for the whole row at once (chunk 0),
    or keeping every chunk's logits for the backward pass, grows the peak by several GB."""
    logits_bytes = 2048 * 152064 * 4
    full, loss_full = _peak(0)
    chunked, loss_chunked = _peak(128)
    assert abs(loss_full - loss_chunked) <= 1e-5 * loss_full
    assert full > logits_bytes  # the measurement sees the full logits when they exist
    assert chunked < 0.1 * full and chunked < 0.3 * logits_bytes, (chunked, full, logits_bytes)
