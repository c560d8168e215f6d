"""Greedy decoding that keeps every row of the batch busy: finished rows leave, queued prompts refill.

    tokens = greedy_decode(model, prompts, max_new=320, eos_ids={2}, slots=64)

`model` is a Hugging Face causal LM (Qwen2 family, full attention). HF `generate` decodes a batch
until its longest row ends and grows its key/value cache by concatenation every step; here

    * a row leaves the batch as soon as it ends (an EOS id, `max_new` tokens, or `finished(tokens)`),
      and the slot it held is refilled from the queue (prompts of the refill are prefilled together,
      left-padded, like HF's own prefill);
    * keys/values live in one preallocated buffer per layer, [slots, kv_heads, capacity, head_dim];
      row i keeps its token at position p in column p, so a decode step writes one column per row
      and attends over columns 0..max_i(p_i) with the mask `column <= p_i`.

The model's own forward runs every step (its norms, projections, rotary embedding and attention);
only the cache object and the 4-D masks are ours (`attention_mask={"full_attention": mask}` is
the mask mapping transformers' decoder models accept as is). Greedy = argmax of the last logits,
first index on ties, as in `generate`. The outputs equal `generate`'s up to floating-point rounding
from batch composition, which moves `generate` itself when its batch size changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

SUPPORTED_MODEL_TYPES = {"qwen2"}


def unsupported(model) -> list[str]:
    """Why `model` cannot run here (empty when it can): architecture, attention layout, and
    generation_config settings that would change greedy decoding inside HF `generate`."""
    cfg, gen = model.config, getattr(model, "generation_config", None)
    why = []
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        why.append(f"model_type {cfg.model_type!r} (supported: {sorted(SUPPORTED_MODEL_TYPES)})")
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        why.append("sliding-window layers")
    if gen is None or gen.eos_token_id is None:
        why.append("no generation_config.eos_token_id")
    if gen is not None:
        changed = {
            "num_beams": (gen.num_beams or 1) != 1,
            "repetition_penalty": (gen.repetition_penalty or 1.0) != 1.0,
            "no_repeat_ngram_size": bool(gen.no_repeat_ngram_size),
            "bad_words_ids": bool(gen.bad_words_ids),
            "min_length": bool(gen.min_length),
            "min_new_tokens": bool(gen.min_new_tokens),
            "suppress_tokens": bool(gen.suppress_tokens),
            "begin_suppress_tokens": bool(gen.begin_suppress_tokens),
            "forced_bos_token_id": gen.forced_bos_token_id is not None,
            "forced_eos_token_id": gen.forced_eos_token_id is not None,
            "sequence_bias": bool(gen.sequence_bias),
        }
        why += [f"generation_config.{k}" for k, v in changed.items() if v]
    return why


class SlotCache:
    """Keys and values of up to `slots` sequences: per layer [slots, kv_heads, capacity, head_dim].

    The model calls `update(key, value, layer_idx)` once per layer and attends over what it returns.
    In `prefill` mode (rows `dst`, left padding `pad`) it copies each row's real columns into its
    slot and returns the new keys/values unchanged (the prompt attends to itself); in `decode` mode
    (live rows 0..n-1 at positions `pos`) it writes column pos_i of row i and returns the buffer's
    first n rows and `width` columns.
    """

    def __init__(self, model, slots: int, capacity: int):
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        shape = (slots, cfg.num_key_value_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.capacity = capacity
        self.mode = "decode"
        self.dst: list[int] = []
        self.pad: list[int] = []
        self.rows = torch.zeros(0, dtype=torch.long)
        self.pos = torch.zeros(0, dtype=torch.long)
        self.width = 0

    def prefill(self, dst: list[int], pad: list[int]) -> None:
        self.mode, self.dst, self.pad = "prefill", dst, pad

    def decode(self, pos: list[int]) -> None:
        device = self.k[0].device
        self.mode, self.width = "decode", max(pos) + 1
        self.pos = torch.tensor(pos, device=device)
        self.rows = torch.arange(len(pos), device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_) -> tuple:
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        if self.mode == "prefill":  # key: [m, kv_heads, P, head_dim], row j's prompt at columns pad_j..P-1
            for j, (slot, pad) in enumerate(zip(self.dst, self.pad)):
                n = key.shape[2] - pad
                kb[slot, :, :n] = key[j, :, pad:]
                vb[slot, :, :n] = value[j, :, pad:]
            return key, value
        kb[self.rows, :, self.pos] = key[:, :, 0]  # key: [n, kv_heads, 1, head_dim]
        vb[self.rows, :, self.pos] = value[:, :, 0]
        n = len(self.pos)
        return kb[:n, :, : self.width], vb[:n, :, : self.width]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` columns into row `dst` (compaction after a row ends)."""
        for kb, vb in zip(self.k, self.v):
            kb[dst, :, :length] = kb[src, :, :length]
            vb[dst, :, :length] = vb[src, :, :length]

    def grow(self, capacity: int) -> None:
        """Widen every buffer to `capacity` columns, keeping what is stored."""
        for buffers in (self.k, self.v):
            for i, b in enumerate(buffers):
                wider = b.new_zeros((*b.shape[:2], capacity, b.shape[3]))
                wider[:, :, : self.capacity] = b
                buffers[i] = wider
        self.capacity = capacity


class _Row:
    __slots__ = ("index", "tokens", "pos")

    def __init__(self, index: int, pos: int):
        self.index, self.tokens, self.pos = index, [], pos


def greedy_decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new: int,
    eos_ids: set[int],
    slots: int,
    finished: Callable[[list[int]], bool] | None = None,
    on_done: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """Generated token ids for each prompt (EOS included when emitted, as `generate` returns it).

    A row ends at an id in `eos_ids`, after `max_new` tokens, or when `finished(tokens)` is true.
    `on_done(i, tokens)` is called as each prompt ends (progress, partial caching).
    """
    out: list[list[int]] = [[] for _ in prompts]
    if max_new <= 0 or not prompts:
        return out
    longest = max(len(p) for p in prompts)
    cache = SlotCache(model, slots, longest + min(max_new, 256))
    queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    live: list[_Row] = []
    refill_at = max(1, slots // 8)
    device = cache.k[0].device
    with torch.inference_mode():
        while queue or live:
            if queue and (slots - len(live) >= refill_at or not live):
                take = [queue.popleft() for _ in range(min(slots - len(live), len(queue)))]
                first = _prefill(model, cache, [prompts[i] for i in take], len(live), device)
                live += [_Row(i, len(prompts[i])) for i in take]
                for row, tok in zip(live[-len(take) :], first):
                    row.tokens.append(tok)
            else:
                _step(model, cache, live, device)
            _retire(live, cache, out, max_new, eos_ids, finished, on_done)
    return out


def _prefill(model, cache: SlotCache, prompts: list[Sequence[int]], start: int, device) -> list[int]:
    """Run left-padded prompts [m, P] into slots start..start+m-1; the first generated token of each."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for j, (p, pad) in enumerate(zip(prompts, pads)):
        ids[j, pad:] = torch.as_tensor(list(p), dtype=torch.long)
        valid[j, pad:] = True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # padding queries attend to themselves only, so no softmax row is empty (NaN would reach V)
    mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool)
    cache.prefill(list(range(start, start + len(prompts))), pads)
    logits = _forward(model, cache, ids.to(device), mask[:, None].to(device), pos.to(device))
    return logits.argmax(-1).tolist()


def _step(model, cache: SlotCache, live: list[_Row], device) -> None:
    """One token for every live row: input [n, 1] at each row's own position."""
    pos = [r.pos + len(r.tokens) - 1 for r in live]  # the last token's position
    if max(pos) + 1 > cache.capacity:
        cache.grow(min(2 * cache.capacity, max(pos) + 1 + cache.capacity))
    cache.decode(pos)
    ids = torch.tensor([[r.tokens[-1]] for r in live], device=device)
    cols = torch.arange(cache.width, device=device)
    mask = (cols[None, :] <= cache.pos[:, None])[:, None, None, :]  # [n, 1, 1, width]
    nxt = _forward(model, cache, ids, mask, cache.pos[:, None]).argmax(-1).tolist()
    for row, tok in zip(live, nxt):
        row.tokens.append(tok)


def _forward(model, cache: SlotCache, ids, mask, pos) -> torch.Tensor:
    """Last-position logits [rows, vocab] in float32 (what `generate` takes its argmax of)."""
    out = model(
        input_ids=ids,
        attention_mask={"full_attention": mask},
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def _retire(live, cache, out, max_new, eos_ids, finished, on_done) -> None:
    """Drop rows that ended; the last live row moves into each freed slot (rows stay 0..n-1)."""
    for slot in range(len(live) - 1, -1, -1):
        row = live[slot]
        toks = row.tokens
        if not (toks[-1] in eos_ids or len(toks) >= max_new or (finished is not None and finished(toks))):
            continue
        out[row.index] = toks
        if on_done is not None:
            on_done(row.index, toks)
        last = len(live) - 1
        if slot != last:
            cache.move(last, slot, live[last].pos + len(live[last].tokens))
            live[slot] = live[last]
        live.pop()
