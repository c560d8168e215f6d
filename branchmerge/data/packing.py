"""Packing tokenized documents into fixed-length rows, and collating rows into model inputs.

    rows = pack(lengths, max_length, seed)        # [[doc, doc, ...], ...] best-fit, seeded order
    batch = collate_packed(docs_of_rows, max_length, pad_id)
      input_ids    (B, L)  documents back to back, right-padded with pad_id
      labels       (B, L)  -100 on prompt tokens, padding and each document's first token
      position_ids (B, L)  restart at 0 for every document (how attention knows the boundaries)
    batch = collate_padded(docs, pad_id)          # the baseline: one document per row + attention_mask

Packed rows must be run with `use_cache=False` and no attention_mask: transformers then builds a
block-diagonal causal mask from position_ids (sdpa), or uses varlen flash-attention, so no token
attends across documents. The first label of each document is masked too, so no loss term
predicts one document from another.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from branchmerge.errors import DataError

IGNORE = -100


def pack(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Best-fit packing of documents (given by length) into rows of `max_length` tokens.

    Documents are visited in a seeded random order; each goes into the open row with the least room
    that still fits it (a new row if none). Rows are then shuffled with the same seed. Every length
    must be <= max_length (truncate or drop first). Deterministic for a given (lengths, seed).
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for doc in order:
        n = lengths[doc]
        if n > max_length:
            raise DataError(f"document {doc} has {n} tokens > max_length {max_length}")
        i = bisect.bisect_left(room, (n, -1))
        if i < len(room):
            cap, r = room.pop(i)
            rows[r].append(doc)
            if cap - n > 0:
                bisect.insort(room, (cap - n, r))
        else:
            rows.append([doc])
            if max_length - n > 0:
                bisect.insort(room, (max_length - n, len(rows) - 1))
    rng.shuffle(rows)
    return rows


def packing_efficiency(lengths: Sequence[int], rows: list[list[int]], max_length: int) -> float:
    """Real tokens / token slots."""
    return sum(lengths[d] for row in rows for d in row) / max(1, len(rows) * max_length)


def collate_packed(
    rows: list[list[dict]], max_length: int, pad_id: int, cross_document_attention: bool = False
) -> dict[str, torch.Tensor]:
    """Rows of documents ({"input_ids", "labels"}) -> packed tensors (see module docstring).

    cross_document_attention=True is "plain packing": positions run through the whole row, so
    attention is causal over the row and crosses documents (the paper's math branch)."""
    b = len(rows)
    input_ids = torch.full((b, max_length), pad_id, dtype=torch.long)
    labels = torch.full((b, max_length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, max_length), dtype=torch.long)
    for i, row in enumerate(rows):
        pos = 0
        for doc in row:
            n = len(doc["input_ids"])
            input_ids[i, pos : pos + n] = torch.tensor(doc["input_ids"])
            lab = torch.tensor(doc["labels"])
            lab[0] = IGNORE  # never predict a document's first token from the previous document
            labels[i, pos : pos + n] = lab
            position_ids[i, pos : pos + n] = torch.arange(n)
            pos += n
        # padding continues the positions so it reads as one trailing pseudo-document (masked from loss)
        position_ids[i, pos:] = torch.arange(max_length - pos)
        if cross_document_attention:
            position_ids[i] = torch.arange(max_length)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_padded(docs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One document per row, right-padded to the longest in the batch, with an attention mask."""
    longest = max(len(d["input_ids"]) for d in docs)
    b = len(docs)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, longest), dtype=torch.long)
    for i, d in enumerate(docs):
        n = len(d["input_ids"])
        input_ids[i, :n] = torch.tensor(d["input_ids"])
        labels[i, :n] = torch.tensor(d["labels"])
        labels[i, 0] = IGNORE  # as in packed rows: the loss never counts a document's first token
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
