"""FSDP2 for branch SFT: `fully_shard` per decoder layer and on the root, meta-device init.

With more than one rank, only rank 0 materialises the full model (from the checkpoint or the seeded
init, on CPU); the other ranks build it on the meta device. Every rank shards its copy, allocates its
shards with `to_empty`, and rank 0's weights are broadcast into them (`broadcast_from_rank0`), so a
32B model never exists in full on more than one rank, and a from-scratch model starts from exactly
the weights a single-process run has. Non-persistent buffers (rotary inv_freq) are broadcast too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from branchmerge.models import build_model, model_config

MIXED_BF16 = ("bf16-mixed", "bf16-true", "bf16")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers: FSDP2 sharding expects a decoder LM")
    return list(layers)


def _non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are not in the state dict (e.g. rotary inv_freq): meta init leaves them empty."""
    persistent = set(model.state_dict())
    return {n: b.detach().clone() for n, b in model.named_buffers() if n not in persistent}


def _restore_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            named[name].copy_(value.to(named[name].device))


def shard_fsdp2(
    cfg: Any, tokenizer: Any, device_mesh: Any, device: torch.device, precision: str
) -> torch.nn.Module:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh is not None and device_mesh.ndim > 1 else device_mesh
    rank = dist.get_rank() if dist.is_initialized() else 0
    multi = dist.is_initialized() and dist.get_world_size() > 1
    full_sd, buffers = None, {}
    if rank == 0 or not multi:
        full = build_model(cfg.model, tokenizer, device="cpu")
        full_sd, buffers = full.state_dict(), _non_persistent_buffers(full)
        config = full.config
        del full
    else:
        config = model_config(cfg.model, tokenizer)
        config._attn_implementation = (
            "sdpa" if cfg.model.attn_implementation == "auto" else (cfg.model.attn_implementation)
        )
    if multi:
        objs = [config, buffers]
        dist.broadcast_object_list(objs, src=0)
        config, buffers = objs
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.strategy.reshard_after_forward}
    if device.type == "cuda" and str(precision) in MIXED_BF16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.strategy.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.to_empty(device="cpu" if cfg.strategy.cpu_offload else device)
    _restore_buffers(model, buffers)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=multi)
    set_model_state_dict(model, full_sd if full_sd is not None else {}, options=opts)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on rank 0 (CPU), None on other ranks. Collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if (not dist.is_initialized() or dist.get_rank() == 0) else None
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
