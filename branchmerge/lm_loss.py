"""The SFT loss: summed token cross-entropy on the label positions, computed in chunks of tokens.

    loss_sum = chunked_token_loss_sum(hidden, lm_head.weight, labels, chunk_tokens=4096)
      hidden (B, L, H): the decoder's final (normed) hidden states; labels (B, L), -100 = not learned
      = Σ_{b, t: labels[b, t+1] != -100} -log softmax(hidden[b, t] · Wᵀ)[labels[b, t+1]]

Only label positions are projected onto the vocabulary, `chunk_tokens` at a time, and each chunk's
logits are recomputed in the backward pass instead of being kept, so at most one chunk of logits
(chunk_tokens × V floats, plus its gradient) exists at any moment. A 16k-token row over a 152k
vocabulary would otherwise hold ~10 GB of fp32 logits, ~30 GB at the backward peak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions of -log p(labels[t+1] | ≤ t), ignoring label -100. logits (B, L, V), labels (B, L)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor):
    return F.cross_entropy(F.linear(h, weight, bias).float(), y, reduction="sum")


def chunked_token_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same sum as `token_loss_sum(hidden @ weight.T + bias, labels)`, see the module docstring.
    chunk_tokens <= 0 projects every label position at once (no recomputation)."""
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if chunk_tokens <= 0 or h.shape[0] <= chunk_tokens:
        return _chunk_loss(h, weight, bias, y)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, h[sl], weight, bias, y[sl], use_reentrant=False)
    return total
