"""A byte-level BPE tokenizer trained on the toy corpus in seconds, saved in Hugging Face format.

Like Qwen2's: byte-level (any text round-trips exactly), digits split one per token, ChatML special
tokens and chat template, `<think>`/`</think>` as special tokens; it also carries the DeepSeek-R1
template's tokens so both templates work in the toy world. The model's embedding is padded past the
tokenizer's size, as Qwen's 151665 tokens sit in 152064 rows: see `padded_vocab_size`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from branchmerge.data.chat import CHATML
from branchmerge.models import padded_vocab_size  # noqa: F401 (re-exported)

PAD = "<|endoftext|>"
SPECIAL_TOKENS = [
    PAD,
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; returns an HF fast tokenizer with ChatML as its chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token=PAD,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        split_special_tokens=False,
    )
    hf.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    hf.chat_template = CHATML
    return hf


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return out
