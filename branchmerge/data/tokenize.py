"""Record -> token ids and labels: the chat template rendered once, loss only on assistant tokens.

The text is tokenized in one piece (so tokens match what the model sees at inference) with character
offsets; a token is learned iff it starts inside an assistant span from `chat.render`. Everything else
(system, user, role headers, the template's BOS) gets label -100.
"""

from __future__ import annotations

from typing import Any

from branchmerge.data.chat import END_OF_TURN, render
from branchmerge.errors import ConfigError

IGNORE = -100


def encode_messages(messages: list[dict[str, str]], tokenizer: Any, template: str) -> dict[str, list[int]]:
    """{"input_ids": [...], "labels": [...]} for one conversation (labels aligned to input_ids)."""
    text, spans = render(messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    si = 0
    for i, (start, _end) in enumerate(offsets):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= start < spans[si][1]:
            labels[i] = ids[i]
    return {"input_ids": ids, "labels": labels}


def check_template_tokens(tokenizer: Any, template: str) -> None:
    """The template's end-of-turn token must be a single token of this tokenizer."""
    eot = END_OF_TURN[template]
    ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(
            f"chat template '{template}' ends turns with {eot!r}, which this tokenizer splits into {len(ids)} "
            "tokens: set data.add_template_tokens=true to add it into the model's padded vocabulary rows "
            "(what the paper's SFT stack does), or train with the model's own template "
            "(data.template=deepseek_r1 for R1-Distill models)"
        )


def add_template_tokens(tokenizer: Any, template: str, vocab_rows: int) -> list[str]:
    """Add the template's end-of-turn token to a tokenizer that lacks it, as a special token that also
    becomes the EOS; returns what was added.

    This is what LLaMA-Factory's `qwen` template (the paper's SFT stack) does to R1-Distill-Qwen's
    tokenizer, which has no `<|im_end|>`: the new id (151665) lands in one of the embedding's padded
    rows (151,665 tokens, 152,064 rows), so the model keeps its shape and every branch stays mergeable.
    `<|im_start|>` is not added: it is tokenized as plain text, as there. Refused when the new tokens
    would not fit in the rows the model has."""
    eot = END_OF_TURN[template]
    if len(tokenizer(eot, add_special_tokens=False)["input_ids"]) == 1:
        return []
    if len(tokenizer) + 1 > vocab_rows:
        raise ConfigError(
            f"cannot add {eot!r} to the tokenizer: it has {len(tokenizer)} tokens and the model only "
            f"{vocab_rows} embedding rows; use the model's own template (data.template=deepseek_r1)"
        )
    tokenizer.add_special_tokens({"eos_token": eot})
    return [eot]
