"""Tokenizers and causal LMs from a `model` config: a local/hub checkpoint, or a Qwen2 built from scratch.

    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok)     # from_pretrained(path) or Qwen2 from `arch` (seeded)

From-scratch models get an embedding padded past the tokenizer (`padded_vocab_size`), as Qwen has.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from branchmerge.errors import ConfigError, MissingFileError
from branchmerge.foundation import DTYPES


def padded_vocab_size(n_tokens: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer of `n_tokens`, rounded up to a multiple of `multiple` (a padded
    vocabulary, so that tests and merges meet config.vocab_size > len(tokenizer) as with Qwen)."""
    return -(-n_tokens // multiple) * multiple


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).exists() or path.count("/") != 1


def _check_exists(path: str, what: str, hint: str) -> None:
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise MissingFileError(f"{what} {path} does not exist. {hint}")


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    path = model_cfg.tokenizer or model_cfg.path
    if path is None:
        raise ConfigError(f"model '{model_cfg.name}' names neither `tokenizer` nor `path`")
    hint = (
        "Build the toy world first: `python distill.py +experiment=toy_data`."
        if "toy" in str(path)
        else "Point model.tokenizer or model.path at a Hugging Face folder or hub id."
    )
    _check_exists(str(path), "tokenizer folder", hint)
    return AutoTokenizer.from_pretrained(str(path))


def attention_implementation(requested: str, device: torch.device | str = "cpu") -> str:
    """`auto` -> flash_attention_2 on CUDA when flash-attn is importable, else sdpa."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_config(model_cfg: Any, tokenizer: PreTrainedTokenizerBase):
    """The HF config a model will have (built from `arch`, or read from `path`), vocabulary checked."""
    if model_cfg.path is not None:
        _check_exists(
            str(model_cfg.path), "model folder", "Point model.path at a Hugging Face folder or hub id."
        )
        config = AutoConfig.from_pretrained(str(model_cfg.path))
    elif model_cfg.arch is not None:
        arch = dict(model_cfg.arch)
        model_type = arch.pop("model_type", "qwen2")
        config = AutoConfig.for_model(
            model_type,
            vocab_size=padded_vocab_size(len(tokenizer)),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **arch,
        )
    else:
        raise ConfigError(f"model '{model_cfg.name}' needs `path` (a checkpoint) or `arch` (to build one)")
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but model '{model_cfg.name}' has only {config.vocab_size} "
            "embedding rows: use the tokenizer the model was trained with"
        )
    return config


def build_model(
    model_cfg: Any, tokenizer: PreTrainedTokenizerBase, device: str = "cpu", attn: str | None = None
) -> PreTrainedModel:
    """The model on `device`; `attn` overrides the attention implementation chosen for `device` (a
    model built on CPU to be trained on CUDA gets the CUDA choice)."""
    attn = attn or attention_implementation(model_cfg.attn_implementation, device)
    dtype = DTYPES[model_cfg.dtype]
    config = model_config(model_cfg, tokenizer)
    if model_cfg.path is not None:
        return AutoModelForCausalLM.from_pretrained(
            str(model_cfg.path), dtype=dtype, attn_implementation=attn
        )
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
