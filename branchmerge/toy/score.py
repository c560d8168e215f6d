"""Greedy scoring of a checkpoint on a toy domain's held-out set with the toy verifier.

    python -m branchmerge.toy.score <HF folder> --domain math [--limit 200]

The quick, dependency-free check used by training tests and notes; `evaluate.py` runs the same
grading through lm-eval with full provenance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from branchmerge.data.records import Record, read_records
from branchmerge.eval.slots import greedy_decode, unsupported
from branchmerge.toy.domains import get_domain


def _chat(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 384, batch_size: int = 64
) -> list[str]:
    """Greedy completions of chat prompts, stopping at the model's EOS: through the slot decoder
    (`branchmerge.eval.slots`, `batch_size` rows kept busy) where the model supports it, else HF
    `generate` on left-padded batches. Both are greedy with the same stopping rule."""
    if not unsupported(model):
        eos = model.generation_config.eos_token_id
        ids = [tokenizer(_chat(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
        toks = greedy_decode(
            model, ids, max_new_tokens, set(eos if isinstance(eos, list) else [eos]), batch_size
        )
        return tokenizer.batch_decode(toks, skip_special_tokens=True)
    tokenizer.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [_chat(tokenizer, p) for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        outs.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return outs


def score_records(model: Any, tokenizer: Any, records: list[Record], **kw) -> dict:
    responses = generate(model, tokenizer, [r.prompt for r in records], **kw)
    verdicts = [
        get_domain(r.domain).verify(resp, r.reference, r.metadata) for r, resp in zip(records, responses)
    ]
    return {
        "n": len(records),
        "correct": sum(verdicts),
        "accuracy": sum(verdicts) / max(1, len(records)),
        "responses": responses,
        "verdicts": verdicts,
    }


def score_checkpoint(model_dir: str | Path, test_file: str | Path, limit: int | None = None, **kw) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = list(read_records(test_file))[:limit]
    return score_records(model, tokenizer, records, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--toy-dir", default="outputs/toy_world")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = score_checkpoint(
        args.model_dir, Path(args.toy_dir) / "data" / args.domain / "test.jsonl", args.limit
    )
    print(json.dumps({k: res[k] for k in ("n", "correct", "accuracy")}))


if __name__ == "__main__":
    main()
