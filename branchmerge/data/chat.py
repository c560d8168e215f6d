"""Chat templates (Jinja, as stored in `tokenizer_config.json`) the paper's models were trained with.

- `chatml`: Qwen's ChatML, which the paper's branches were trained with (LLaMA-Factory's "qwen").
- `deepseek_r1`: the DeepSeek-R1 / R1-Distill template.
Both end the assistant turn with a dedicated end-of-turn token (`END_OF_TURN`), which becomes the EOS
of the exported generation_config.
"""

from __future__ import annotations

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEEPSEEK_R1 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)

TEMPLATES = {"chatml": CHATML, "deepseek_r1": DEEPSEEK_R1}
END_OF_TURN = {"chatml": "<|im_end|>", "deepseek_r1": "<｜end▁of▁sentence｜>"}
BOS = {"chatml": None, "deepseek_r1": "<｜begin▁of▁sentence｜>"}


def get_template(name: str) -> str:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template '{name}'; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render(messages: list[dict[str, str]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation exactly as the Jinja template does, plus the character spans the model
    learns: each assistant turn's content and its end-of-turn token (loss only on these).

    >>> render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chatml")
    ('<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n', [(35, 46)])
    """
    get_template(template)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(text: str, learn: bool = False) -> None:
        nonlocal pos
        if learn:
            spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)

    eot = END_OF_TURN[template]
    if template == "chatml":
        for m in messages:
            emit(f"<|im_start|>{m['role']}\n")
            if m["role"] == "assistant":
                emit(m["content"] + eot, learn=True)
                emit("\n")
            else:
                emit(m["content"] + eot + "\n")
    else:  # deepseek_r1
        emit(BOS[template])
        for m in messages:
            if m["role"] == "system":
                emit(m["content"])
            elif m["role"] == "user":
                emit("<｜User｜>" + m["content"])
            else:
                emit("<｜Assistant｜>")
                emit(m["content"] + eot, learn=True)
    return "".join(parts), spans
