"""Estimate a model's diagonal Fisher on a calibration set, for `fisher` merging of checkpoints that
were not trained with `fisher.enabled=true`.

    python -m branchmerge.merge.importance <HF folder> <calibration.jsonl> [--samples 64]

F_i = (1/N) Σ_n (∂ L_n / ∂θ_i)², L_n the assistant-token loss of calibration record n (one record per
backward pass: the per-example empirical Fisher). Writes `<HF folder>/fisher.safetensors` with the
checkpoint's tensor names, which the merge engine finds on its own. This tool instantiates the model
(it needs gradients); the merge engine itself never does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from branchmerge.data.records import read_records
from branchmerge.data.tokenize import encode_messages
from branchmerge.errors import DataError
from branchmerge.lm_loss import token_loss_sum


def estimate_fisher(
    model_dir: str | Path, calibration: str | Path, samples: int = 64, template: str = "chatml"
) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.train()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    records = list(read_records(calibration, require_response=True))[:samples]
    if not records:
        raise DataError(f"{calibration} has no records with an assistant turn")
    for rec in records:
        enc = encode_messages(rec.messages, tok, template)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        n_label = int((labels[:, 1:] != -100).sum())
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model(input_ids=ids, use_cache=False).logits, labels) / max(1, n_label)
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                sums[n].add_(p.grad.detach().pow(2))
    fisher = {n: (s / len(records)).contiguous() for n, s in sums.items()}
    if model.config.tie_word_embeddings:
        fisher.pop("lm_head.weight", None)
    return fisher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--template", default="chatml")
    args = ap.parse_args()
    fisher = estimate_fisher(args.model_dir, args.calibration, args.samples, args.template)
    out = args.model_dir / "fisher.safetensors"
    save_file(
        fisher,
        out,
        metadata={
            "kind": "diagonal_empirical_fisher",
            "samples": str(args.samples),
            "calibration": str(args.calibration),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
