"""Diagonal Fisher importance for the merge engine: F_i = (1/N) Σ_{last N steps} g_i², where g is the
gradient of the step's global-batch loss (the empirical Fisher of that batch), per parameter, taken
before gradient clipping (clipping rescales the whole gradient by the step's norm).

Each rank accumulates the squares of its own gradient shard (under FSDP2 a sum costs 4 bytes per
parameter / world size), and `write` gathers and writes one tensor at a time, so neither the sums nor
the file ever exist in full in one process's memory. Saved as `<run dir>/fisher.safetensors` under
the same tensor names as the exported checkpoint, with metadata (steps, step range).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from branchmerge.hf_io import ShardWriter
from branchmerge.train.parallel import full_tensors, global_rank

log = logging.getLogger(__name__)


class FisherAccumulator:
    def __init__(self, last_n_steps: int, total_steps: int) -> None:
        self.first_step = max(0, total_steps - last_n_steps)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def accumulate(self, model: torch.nn.Module, step: int) -> None:
        """Call after backward, before clipping and the optimizer step, at (0-based) optimizer step `step`."""
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

    def _means(self, model: torch.nn.Module):
        """(name, mean squared gradient) per parameter, still sharded like the parameter."""
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters())
        for name, s in self.sums.items():
            p = params[name]
            if isinstance(p, DTensor):
                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            yield name, s / max(1, self.steps)

    def write(self, model: torch.nn.Module, path: str | Path) -> None:
        """Gather and write `path` tensor by tensor (collective under FSDP2: every rank calls it; rank 0
        writes). Tensors are named as in the export; a tied output embedding is written once."""
        path = Path(path)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        params = dict(model.named_parameters())
        names = [n for n in self.sums if not (tied and n == "lm_head.weight")]
        wanted = set(names)
        gathered = full_tensors((n, t) for n, t in self._means(model) if n in wanted)
        if global_rank() != 0:
            for _ in gathered:
                pass
            return
        meta = {
            "steps": str(self.steps),
            "first_step": str(self.first_step),
            "kind": "diagonal_empirical_fisher",
        }
        plan = [(n, tuple(params[n].shape), torch.float32) for n in names]
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(tmp, plan, max_shard_bytes=1 << 62, metadata=meta, stem="fisher")
        for name, t in gathered:
            writer.write(name, t.float())
        writer.close()
        os.replace(tmp / "fisher.safetensors", path)
        tmp.rmdir()
