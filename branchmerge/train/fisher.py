"""Diagonal Fisher importance for the merge engine: F_i = (1/N) Σ_{last N steps} g_i², where g is the
gradient of the step's global-batch loss (the empirical Fisher of that batch), per parameter.

Saved as `<run dir>/fisher.safetensors` under the same tensor names as the exported checkpoint, with
metadata (steps, step range), for Fisher-weighted merging.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


class FisherAccumulator:
    def __init__(self, last_n_steps: int, total_steps: int) -> None:
        self.first_step = max(0, total_steps - last_n_steps)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def accumulate(self, model: torch.nn.Module, step: int) -> None:
        """Call after backward, before the optimizer step, at (0-based) optimizer step `step`."""
        if step < self.first_step:
            return
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.detach()
            g = g.to_local() if hasattr(g, "to_local") else g
            sq = g.float().pow(2)
            self.sums[name] = self.sums[name].add_(sq) if name in self.sums else sq.clone()
        self.steps += 1

    def state_dict(self) -> dict:
        return {"sums": self.sums, "steps": self.steps, "first_step": self.first_step}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.steps, self.first_step = state["sums"], state["steps"], state["first_step"]

    def full(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Mean squared gradients, unsharded (collective under FSDP2: every rank must call)."""
        from torch.distributed.tensor import DTensor

        out = {}
        params = dict(model.named_parameters())
        for name, s in self.sums.items():
            p = params[name]
            if isinstance(p, DTensor):
                s = DTensor.from_local(
                    s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                ).full_tensor()
            out[name] = (s / max(1, self.steps)).cpu()
        return out

    def save(self, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
        meta = {
            "steps": str(self.steps),
            "first_step": str(self.first_step),
            "kind": "diagonal_empirical_fisher",
        }
        tmp = Path(str(path) + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        tmp.replace(path)
