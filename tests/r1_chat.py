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


# DeepSeek-R1-Distill-Qwen's added tokens, ids 151643..151664 in this order (its tokenizer_config.json):
# Qwen2.5's layout with the first seven replaced by R1's chat and reasoning tokens. No ChatML tokens.
R1_DISTILL_ADDED = [
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
R1_DISTILL_FIRST_ADDED = 151643  # the BPE vocabulary's size
R1_DISTILL_ROWS = 152064  # the model's embedding rows (151,665 tokens, padded)


def r1_distill_tokenizer(save_to: str | Path | None = None):
    """A tokenizer with R1-Distill-Qwen's special-token layout: a small byte-level BPE (the toy
    tokenizer's) whose vocabulary is filled with unreachable entries up to 151,643, then R1-Distill's
    22 added tokens at ids 151643..151664 (len 151,665, as the real one), BOS/EOS/pad as there, no
    `<|im_start|>`/`<|im_end|>`, and the R1 template. Built locally in about a second."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((TOY_BASE / "tokenizer.json").read_text())
    chat = {a["content"] for a in spec["added_tokens"]}
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if t not in chat}
    ordered = sorted(vocab, key=vocab.get)
    vocab = {t: i for i, t in enumerate(ordered)}
    for i in range(len(vocab), R1_DISTILL_FIRST_ADDED):
        vocab[f"\u2400unused{i}"] = i  # no merge produces these: they only fill the id space
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {
            "id": R1_DISTILL_FIRST_ADDED + k,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": sp,
        }
        for k, (c, sp) in enumerate(R1_DISTILL_ADDED)
    ]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
        clean_up_tokenization_spaces=False,
        model_max_length=16384,
    )
    tok.chat_template = R1_TEMPLATE
    if save_to is not None:
        tok.save_pretrained(save_to)
    return tok


def pico_r1_distill(save_to: str | Path, max_positions: int = 2048):
    """R1-Distill-Qwen-32B's shape in miniature: Qwen2, untied, 152,064 embedding rows, GQA, bf16 on disk,
    with `r1_distill_tokenizer`; random weights (seeded). Saved as an HF folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = r1_distill_tokenizer(save_to)
    cfg = Qwen2Config(
        vocab_size=R1_DISTILL_ROWS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(save_to)
    return model, tok
