"""The LightningModule of branch SFT: a Hugging Face causal LM, loss on assistant tokens only.

One training_step = one optimizer step (manual optimization): the step batch holds this rank's
micro-batches and the label-token count of the whole global batch, so the loss is

    L = (1 / N_global) * Σ_{ranks, micro-batches, tokens} -log p(label)

exactly, whatever the world size or accumulation (each rank backpropagates its partial sum times
world_size / N_global; DDP and FSDP average gradients over ranks). Packed rows run with
`use_cache=False` and position_ids only, so attention stays inside each document.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from branchmerge.models import build_model
from branchmerge.train.fisher import FisherAccumulator
from branchmerge.train.parallel import shard_fsdp2
from branchmerge.train.schedule import build_optimizer

log = logging.getLogger(__name__)

# dense bf16 peak FLOP/s per GPU, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions of -log p(labels[t+1] | ≤ t), ignoring label -100. logits (B, L, V), labels (B, L)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


class BranchSFT(L.LightningModule):
    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.automatic_optimization = False
        self.model: torch.nn.Module | None = None
        self.total_steps = 0
        self.fisher: FisherAccumulator | None = None
        self.packing_efficiency: float | None = None
        self._t_last: float | None = None
        self.n_params = 0

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.total_steps = dm.total_steps
        self.packing_efficiency = dm.stats.get("packing_efficiency")
        if self.cfg.fisher.enabled and self.fisher is None:
            self.fisher = FisherAccumulator(self.cfg.fisher.last_n_steps, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.fisher is not None and self.cfg.strategy.name != "fsdp2":
            checkpoint["fisher"] = self.fisher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.fisher is not None and "fisher" in checkpoint:
            self.fisher.load_state_dict(checkpoint["fisher"])

    # ---- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        cfg = self.cfg
        if cfg.strategy.name == "fsdp2":
            self.model = shard_fsdp2(
                cfg, self.tokenizer, self.device_mesh, self.device, self.trainer.precision
            )
        else:
            self.model = build_model(cfg.model, self.tokenizer, device=str(self.device))
            if cfg.trainer.gradient_checkpointing:
                self.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        self.model.config.use_cache = False
        if cfg.trainer.compile:  # in place: parameter names (checkpoints, export) stay unprefixed
            self.model.compile()
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.model.named_parameters(), self.cfg.optim, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs, use_cache=False).logits

    # ---- one optimizer step ----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt, sched = self.optimizers(), self.lr_schedulers()
        world = self.trainer.world_size
        n_global = max(1, batch["n_label_tokens"])
        micro = batch["micro_batches"]
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last only
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            part = token_loss_sum(self(mb), mb["labels"])
            self.manual_backward(part * (world / n_global))
            loss_sum += part.detach()
        grad_norm = self._clip(self.cfg.optim.grad_clip)
        if self.fisher is not None:
            self.fisher.accumulate(self.model, self.global_step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._log_step(batch, loss_sum, grad_norm, sched.get_last_lr()[0])
        return loss_sum

    def _clip(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _log_step(self, batch: dict, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        total = self.trainer.strategy.reduce(loss_sum, reduce_op="sum")
        loss = total / max(1, batch["n_label_tokens"])
        now = time.perf_counter()
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm.detach().float(),
            "train/lr": lr,
            "train/epoch": float(batch["epoch"]),
            "train/label_tokens": float(batch["n_label_tokens"]),
        }
        if self._t_last is not None:
            tps = batch["n_tokens"] / (now - self._t_last)
            metrics["train/tokens_per_s"] = tps
            mfu = self._mfu(tps)
            if mfu is not None:
                metrics["train/mfu"] = mfu
        if self.packing_efficiency is not None:
            metrics["train/packing_efficiency"] = self.packing_efficiency
        self._t_last = now
        self.log_dict(metrics, on_step=True, prog_bar=False, rank_zero_only=True, batch_size=1)
        self.log("loss", loss, prog_bar=True, on_step=True, rank_zero_only=True, batch_size=1)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak is None:
            return None
        c = self.model.config
        attn = 12 * c.num_hidden_layers * c.hidden_size * self.cfg.data.max_length / 2  # causal, per token
        return tokens_per_s * (6 * self.n_params + attn) / (peak * self.trainer.world_size)
