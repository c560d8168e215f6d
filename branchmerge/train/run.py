"""`python train.py ...`: validate, build data + model + strategy, fit with resume, export, Fisher.

Writes under the run dir (outputs/train/<run_name>/):
    checkpoints/step-*.ckpt   periodic, atomic; the newest complete one is resumed automatically
    logs/metrics.csv          loss, lr, grad norm, tokens/s, packing efficiency (+ MFU on CUDA)
    data_stats.json           records, overlong (dropped / truncated), tokens, rows, packing efficiency
    export/                   the HF folder (see branchmerge.train.export)
    fisher.safetensors        diagonal Fisher over the last N steps (when fisher.enabled)
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import TrainConfig
from branchmerge.data.datamodule import BranchDataModule
from branchmerge.data.tokenize import add_template_tokens, check_template_tokens
from branchmerge.errors import ConfigError, MissingFileError
from branchmerge.models import attention_implementation, load_tokenizer, model_config
from branchmerge.train.checkpoint import AtomicCheckpoint, newest_checkpoint
from branchmerge.train.export import export_hf, export_plan
from branchmerge.train.module import BranchSFT
from branchmerge.train.parallel import full_tensors

log = logging.getLogger(__name__)


def make_strategy(cfg: Any, on_gpu: bool):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    s, t = cfg.strategy, cfg.trainer
    backend = s.backend or ("nccl" if on_gpu else "gloo")
    world = int(t.devices) * t.num_nodes if str(t.devices).isdigit() else None
    if s.name == "single":
        if str(t.devices) not in ("1", "auto") or t.num_nodes != 1:
            raise ConfigError(
                "strategy=single runs one process: set trainer.devices=1 or pick strategy=ddp/fsdp2"
            )
        return "auto"
    timeout = timedelta(seconds=s.timeout_s)
    if s.name == "ddp":
        return DDPStrategy(process_group_backend=backend, timeout=timeout)
    if world is None:
        raise ConfigError("strategy=fsdp2 needs an explicit trainer.devices (an integer)")
    if s.cpu_offload:
        raise ConfigError(
            "strategy.cpu_offload=true is not supported: Lightning's ModelParallelStrategy moves every "
            "parameter to the GPU after sharding, which breaks FSDP2's CPU-offloaded shards. Shard over "
            "more GPUs instead (raise trainer.num_nodes; `python -m branchmerge.train.plan` shows the "
            "memory per GPU) and set strategy.cpu_offload=false"
        )
    return ModelParallelStrategy(
        data_parallel_size=world,
        tensor_parallel_size=1,
        save_distributed_checkpoint=True,
        process_group_backend=backend,
        timeout=timeout,
    )


def _prepare_tokenizer(cfg: Any, tokenizer: Any) -> None:
    """Add the template's missing end-of-turn token when asked (every rank does the same, so ids
    agree), then check the template and the sequence length against the model."""
    mc = model_config(cfg.model, tokenizer)
    if cfg.data.add_template_tokens:
        added = add_template_tokens(tokenizer, cfg.data.template, mc.vocab_size)
        if added:
            log.info("added %s to the tokenizer (ids %s)", added, tokenizer.convert_tokens_to_ids(added))
    check_template_tokens(tokenizer, cfg.data.template)
    limit = cfg.model.max_position_embeddings or getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds what model '{cfg.model.name}' can take "
            f"(max_position_embeddings={limit}); lower data.max_length"
        )


def check_attention(cfg: Any, on_gpu: bool) -> str:
    """The attention implementation the run will use; refuses packed rows of several sequences per
    micro-batch on flash-attention, whose per-document (varlen) path reads document boundaries from
    position_ids only for one row at a time (with more rows it would attend across documents)."""
    attn = attention_implementation(cfg.model.attn_implementation, "cuda" if on_gpu else "cpu")
    d = cfg.data
    per_document = d.packing and not d.cross_document_attention
    if attn == "flash_attention_2" and per_document and cfg.trainer.micro_batch_size > 1:
        raise ConfigError(
            f"trainer.micro_batch_size={cfg.trainer.micro_batch_size} with packed rows on "
            "flash_attention_2: its per-document path takes one packed row per micro-batch; set "
            "trainer.micro_batch_size=1 (raise data.max_length to fit more documents per row)"
        )
    return attn


def training_signature(cfg: dict) -> dict:
    """What determines the trained weights (not where they go, how often we log, or thread counts)."""
    t = cfg["trainer"]
    return {
        "model": cfg["model"],
        "data": cfg["data"],
        "optim": cfg["optim"],
        "seed": cfg["seed"],
        "fisher": cfg.get("fisher"),
        "trainer": {k: t[k] for k in ("epochs", "max_steps", "global_batch_size")},
    }


def _quiet_lightning() -> None:
    """Lightning adds its own console handler; Hydra's already prints (and files) every record once."""
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def train(cfg: DictConfig) -> float | None:
    raw_cfg = cfg
    t_start = time.time()
    _quiet_lightning()
    cfg = validate(cfg, TrainConfig)
    run_dir = Path(cfg.paths.run_dir)
    export_dir = run_dir / "export"
    if cfg.resume == "auto" and (export_dir / "branchmerge.json").exists():
        done = json.loads((export_dir / "branchmerge.json").read_text())
        if training_signature(done["config"]) != training_signature(
            OmegaConf.to_container(cfg, resolve=True)
        ):
            raise ConfigError(
                f"{run_dir} holds a finished run with a different recipe (model, data, optimisation or "
                "schedule); pick another run_name, delete that folder, or set resume=never to overwrite it"
            )
        log.info(
            "run %s is finished (%s exists); delete it or set resume=never to train again",
            run_dir,
            export_dir,
        )
        return done.get("final_loss")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.model)
    _prepare_tokenizer(cfg, tokenizer)
    on_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (
        cfg.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    log.info("attention: %s", check_attention(cfg, on_gpu))
    strategy = make_strategy(cfg, on_gpu)
    if on_gpu:
        from branchmerge.train import plan

        card = torch.cuda.get_device_properties(0).total_memory / 2**30
        plan.check(
            cfg, {"gpu_memory_gib": card}
        )  # logs memory per GPU and GPU-hours; refuses what cannot fit

    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = None
    if cfg.resume == "auto":
        ckpt_path = newest_checkpoint(ckpt_dir)  # stale partial ones: removed by rank 0 (AtomicCheckpoint)
    elif cfg.resume != "never":
        ckpt_path = Path(cfg.resume)
        if not ckpt_path.exists():
            raise MissingFileError(
                f"resume={cfg.resume} does not exist; use resume=auto or a step-*.ckpt path"
            )
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)

    dm = BranchDataModule(cfg.data, tokenizer, cfg.trainer, Path(cfg.paths.output_dir) / "cache" / "datasets")
    loggers = [instantiate(v) for v in cfg.logger.values()]
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=cfg.trainer.precision,
        max_epochs=1,
        logger=loggers,
        callbacks=[
            AtomicCheckpoint(
                ckpt_dir, cfg.trainer.checkpoint_every_n_steps, cfg.trainer.keep_last_checkpoints
            )
        ],
        enable_checkpointing=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    module = BranchSFT(cfg, tokenizer)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        return _finish(cfg, raw_cfg, trainer, module, dm, tokenizer, export_dir, time.time() - t_start)
    finally:
        for lg in loggers:
            if hasattr(lg, "finalize"):
                lg.finalize("success")


def _finish(cfg, raw_cfg, trainer, module, dm, tokenizer, export_dir, seconds: float) -> float | None:
    """Export and Fisher, streamed tensor by tensor (collective: every rank runs this; rank 0 writes)."""
    run_dir = export_dir.parent
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    final_loss = metrics.get("train/loss")
    model = module.model
    if trainer.is_global_zero:
        (run_dir / "data_stats.json").write_text(json.dumps(dm.stats, indent=2))
    if cfg.export:
        plan = export_plan(model, cfg.model.dtype)
        wanted = {name for name, _, _ in plan}
        gathered = full_tensors((n, t) for n, t in model.state_dict().items() if n in wanted)
        if trainer.is_global_zero:
            provenance = {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "data_stats": dm.stats,
                "final_loss": final_loss,
                "steps": trainer.global_step,
                "train_seconds": round(
                    seconds, 1
                ),  # this process's wall time (a resumed run: since the resume)
                "accelerator": "cuda"
                if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
                else "cpu",
                "world_size": trainer.world_size,
                "hydra_overrides": _overrides(raw_cfg),
            }
            export_hf(gathered, plan, model.config, tokenizer, cfg.data.template, export_dir, provenance)
            log.info("exported %s", export_dir)
        else:
            for _ in gathered:
                pass
    if module.fisher is not None:
        module.fisher.write(model, run_dir / "fisher.safetensors")
        log.info("fisher importance over %d steps: %s", module.fisher.steps, run_dir / "fisher.safetensors")
    if trainer.is_global_zero:
        _summary(run_dir, dm.stats, final_loss, trainer.global_step)
    return final_loss


def _overrides(cfg: DictConfig) -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # "HydraConfig was not set": called outside a Hydra app (tests, notebooks)
        return []


def _summary(run_dir: Path, stats: dict, loss: float | None, steps: int) -> None:
    eff = stats.get("packing_efficiency")
    lines = [
        f"run dir      {run_dir}",
        f"steps        {steps}",
        f"final loss   {loss if loss is None else round(loss, 4)}",
        f"records      {stats['records']} (overlong {stats['overlong']}: {stats['overlong_action']})",
        f"packing      {'off' if eff is None else f'{eff:.1%} of token slots hold real tokens'}",
        f"export       {run_dir / 'export'}",
    ]
    log.info("training finished\n%s", "\n".join(lines))
