"""An R1-Distill-shaped chat tokenizer for tests: the toy BPE plus DeepSeek-R1's chat tokens and template.

The template follows the public DeepSeek-R1(-Distill) one in what matters here: BOS first, the system
prompt, `<｜User｜>` / `<｜Assistant｜>` turns ended by `<｜end▁of▁sentence｜>`, the reasoning of earlier
assistant turns dropped (only what follows `</think>` is kept), and a generation prompt that opens the
think block: `<｜Assistant｜><think>\\n`. Tool calls are left out. Built locally, never downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TOY_BASE

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
GENERATION_PROMPT = ASSISTANT + "<think>\n"

R1_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif -%}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif -%}"
)


def r1_tokenizer(save_to: str | Path | None = None):
    """The toy BPE with R1's special tokens (BOS, EOS as end of turn and padding, User, Assistant),
    `<think>`/`</think>` as added tokens that are *not* special (so decoding keeps them, as with
    R1-Distill's), and the R1 template; saved when asked."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((TOY_BASE / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] not in ("<think>", "</think>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tok.chat_template = R1_TEMPLATE
    if save_to is not None:
        tok.save_pretrained(save_to)
    return tok


def pico_r1(save_to: str | Path):
    """A pico Qwen2 (2 layers, hidden 32, random weights) with the R1 tokenizer, saved as an HF folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = r1_tokenizer(save_to)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(save_to)
    return model, tok
