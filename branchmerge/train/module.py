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
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from branchmerge.lm_loss import chunked_token_loss_sum
from branchmerge.models import build_model
from branchmerge.train.fisher import FisherAccumulator
from branchmerge.train.flops import (
    attention_flops,
    matmul_flops,
    model_flops_utilization,
    peak_bf16_flops,
    shape_from_config,
)
from branchmerge.train.parallel import shard_fsdp2
from branchmerge.train.schedule import build_optimizer

log = logging.getLogger(__name__)


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    scale: float,
) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step; returns Σ of their loss sums.

    Gradients are synchronised on every micro-batch: under FSDP2 each backward reduce-scatters into
    the gradient shards, as ZeRO-3 does, so a rank never holds more than its shard of the gradient
    (skipping the sync until the last micro-batch would keep an unsharded fp32 gradient of the whole
    model on every rank: ~131 GB at 32B)."""
    loss_sum = torch.zeros((), device=micro_batches[0]["input_ids"].device)
    for mb in micro_batches:
        part = loss_of(mb)
        if hasattr(model, "unshard"):
            # FSDP2: the loss used the output embedding inside the forward; gather it again for the
            # backward (the model's outputs, which would trigger that, are not part of the loss)
            model.unshard()
        backward(part * scale)
        loss_sum += part.detach()
    return loss_sum


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
        self._peak: float | None = None  # the GPU's bf16 peak FLOP/s (0: unknown)

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
        """Summed token loss of one micro-batch (see branchmerge.lm_loss).

        The model's own forward runs with `logits_to_keep=1`, so its full-vocabulary projection of
        every position never happens. The loss is computed from the decoder's final hidden states in a
        forward hook, i.e. still inside the model's forward, where FSDP2 holds the output embedding
        gathered (outside it, the weight is a shard again), and only at label positions, in chunks."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        head = self.model.get_output_embeddings()
        chunk = self.cfg.trainer.loss_chunk_tokens
        losses: list[torch.Tensor] = []

        def loss_hook(_module, _args, out) -> None:
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            losses.append(chunked_token_loss_sum(hidden, head.weight, batch["labels"], chunk, head.bias))

        hook = self.model.get_decoder().register_forward_hook(loss_hook)
        try:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        return losses[0]

    # ---- one optimizer step ----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt, sched = self.optimizers(), self.lr_schedulers()
        scale = self.trainer.world_size / max(1, batch["n_label_tokens"])
        micro = [{k: v.to(self.device) for k, v in mb.items()} for mb in batch["micro_batches"]]
        loss_sum = accumulate_gradients(self.model, micro, self, self.manual_backward, scale)
        if self.fisher is not None:  # the step's own gradient, before clipping rescales it
            self.fisher.accumulate(self.model, self.global_step)
        grad_norm = self._clip(self.cfg.optim.grad_clip)
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
            mfu = self._mfu(batch, now - self._t_last)
            if mfu is not None:
                metrics["train/mfu"] = mfu
        if self.packing_efficiency is not None:
            metrics["train/packing_efficiency"] = self.packing_efficiency
        self._t_last = now
        self.log_dict(metrics, on_step=True, prog_bar=False, rank_zero_only=True, batch_size=1)
        self.log("loss", loss, prog_bar=True, on_step=True, rank_zero_only=True, batch_size=1)

    def _mfu(self, batch: dict, seconds: float) -> float | None:
        """Model FLOPs of the step (weight matmuls over its tokens, attention over its attention
        spans: per document, or per row for plain packing) / (seconds x peak x GPUs)."""
        if self.device.type != "cuda":
            return None
        if self._peak is None:
            self._peak = peak_bf16_flops(torch.cuda.get_device_name(self.device)) or 0.0
            if not self._peak:
                log.warning("no bf16 peak known for %s: MFU is not logged", torch.cuda.get_device_name())
        if not self._peak:
            return None
        shape = shape_from_config(self.model.config)
        flops = matmul_flops(shape, batch["n_tokens"]) + attention_flops(shape, batch["attn_spans"])
        return model_flops_utilization(flops, seconds, self._peak, self.trainer.world_size)
