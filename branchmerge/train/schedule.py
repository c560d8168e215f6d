"""The paper's optimisation: AdamW(β=(0.9, 0.95), eps=1e-8, wd=0.01), warmup ratio 0.1, then constant
(math, code branches) or cosine (science) learning rate."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_lambda(
    step: int, total_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup from 1/warmup to 1."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(params, optim: Any, total_steps: int):
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach: one multi-tensor kernel per group instead of a Python loop over every parameter
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total_steps, optim.warmup_ratio, optim.schedule, optim.min_lr_ratio)
    )
    return opt, sched
