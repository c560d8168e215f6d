"""Export a trained model as a plain Hugging Face folder (what every later stage reads).

<run dir>/export/
  model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
  config.json, generation_config.json (EOS = the chat template's end-of-turn token)
  tokenizer files (chat_template = the template trained with)
  branchmerge.json (resolved training config, git revision, data stats)

Tensors arrive one at a time (gathered from the shards by `parallel.full_tensors`) and go straight to
disk through the planned shard writer, so the exporting rank never holds more than one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from branchmerge.data.chat import END_OF_TURN, TEMPLATES
from branchmerge.foundation import DTYPES, atomic_dir
from branchmerge.hf_io import ShardWriter
from branchmerge.utils.git import git_revision

Plan = list[tuple[str, tuple[int, ...], torch.dtype]]


def export_plan(model: torch.nn.Module, dtype: str) -> Plan:
    """(name, global shape, dtype) of every tensor the export writes, in state-dict order (a tied
    output embedding is written once, as the input embedding)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return [
        (name, tuple(t.shape), DTYPES[dtype])
        for name, t in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    ]


def export_hf(
    tensors: Iterable[tuple[str, torch.Tensor]],
    plan: Plan,
    config: Any,
    tokenizer: Any,
    template: str,
    out_dir: str | Path,
    provenance: dict,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write the folder atomically (built beside `out_dir`, renamed at the end). `tensors` yields the
    plan's tensors in its order (any dtype; cast here)."""
    torch_dtype = plan[0][2]
    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
        for name, t in tensors:
            writer.write(name, t.to(torch_dtype))
        writer.close()
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = torch_dtype
        config.use_cache = True
        config.eos_token_id = eot_id
        config.save_pretrained(tmp)
        GenerationConfig(
            eos_token_id=eot_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            do_sample=True,
            temperature=0.6,
            top_p=0.95,
        ).save_pretrained(tmp)
        tokenizer.chat_template = TEMPLATES[template]
        tokenizer.eos_token = END_OF_TURN[template]
        tokenizer.save_pretrained(tmp)
        (tmp / "branchmerge.json").write_text(
            json.dumps({"git_revision": git_revision(), **provenance}, indent=2, default=str)
        )
    return Path(out_dir)
