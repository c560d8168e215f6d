"""Record -> token ids and labels: the chat template rendered once, loss only on assistant tokens.

The text is tokenized in one piece (so tokens match what the model sees at inference) with character
offsets; a token is learned iff it starts inside an assistant span from `chat.render`. Everything else
(system, user, role headers, the template's BOS) gets label -100.
"""

from __future__ import annotations

from typing import Any

from branchmerge.data.chat import END_OF_TURN, render

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
        raise ValueError(
            f"chat template '{template}' ends turns with {eot!r}, which this tokenizer splits into {len(ids)} "
            "tokens: pick the template the model was trained with (data.template=chatml or deepseek_r1)"
        )
