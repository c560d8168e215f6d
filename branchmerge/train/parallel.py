"""FSDP2 for branch SFT: `fully_shard` per decoder layer and on the root, meta-device init.

With more than one rank, only rank 0 materialises the full model (from the checkpoint or the seeded
init, on CPU); the other ranks build it on the meta device. Every rank shards its copy, allocates its
shards with `to_empty`, and rank 0's weights are broadcast into them (`broadcast_from_rank0`), so a
32B model never exists in full on more than one rank, and a from-scratch model starts from exactly
the weights a single-process run has. Non-persistent buffers (rotary inv_freq) are broadcast too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from branchmerge.errors import CheckpointError
from branchmerge.models import attention_implementation, build_model, model_config

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
    """The model, sharded with `fully_shard` per decoder layer and on the root, its weights in place.

    Every rank builds the model on the meta device and allocates only its shards. A checkpoint
    (`model.path`) is read by every rank at once, each its own slices of each tensor from the
    memory-mapped safetensors files, so no rank loads the whole model while the others wait in a
    collective. A from-scratch model (`model.arch`) is initialised by rank 0 alone, seeded as a
    single-process run would, and broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    mesh = device_mesh["data_parallel"] if device_mesh is not None and device_mesh.ndim > 1 else device_mesh
    multi = dist.is_initialized() and dist.get_world_size() > 1
    attn = attention_implementation(cfg.model.attn_implementation, device)
    full_sd, buffers = None, {}
    if cfg.model.path is None and (global_rank() == 0 or not multi):
        full = build_model(cfg.model, tokenizer, device="cpu", attn=attn)
        full_sd, buffers = full.state_dict(), _non_persistent_buffers(full)
        del full
    config = model_config(cfg.model, tokenizer)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.strategy.reshard_after_forward}
    if device.type == "cuda" and str(precision) in MIXED_BF16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.to_empty(device=device)
    if cfg.model.path is not None:
        folder = local_model_folder(str(cfg.model.path))
        _restore_buffers(model, _fresh_buffers(model))
        load_local_shards(model, folder)
    else:
        if multi:
            objs = [buffers]
            dist.broadcast_object_list(objs, src=0)
            buffers = objs[0]
        _restore_buffers(model, buffers)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=multi)
        set_model_state_dict(model, full_sd if full_sd is not None else {}, options=opts)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def local_model_folder(path: str) -> Path:
    """A local folder as is; a hub id resolved to its cached snapshot (downloaded if missing; every
    rank may call this at once: the hub client locks each file, so one process downloads it)."""
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def _fresh_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (rotary inv_freq) computed on CPU by re-creating the small modules that
    own them from the model's config (meta init leaves them empty)."""
    persistent = set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        own = [
            n for n, _ in module.named_buffers(recurse=False) if f"{mname}.{n}".lstrip(".") not in persistent
        ]
        if not own:
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError as e:
            raise TypeError(
                f"cannot rebuild the buffers {own} of {mname} ({type(module).__name__}) from the config; "
                "load this architecture with model.arch or a single process"
            ) from e
        for n in own:
            out[f"{mname}.{n}".lstrip(".")] = getattr(fresh, n).detach().cpu()
    return out


def load_local_shards(model: torch.nn.Module, folder: Path) -> None:
    """Copy each parameter's local shard (and any unsharded tensor) from the safetensors files in
    `folder`, reading only that shard's slice of each tensor. Shapes are checked against the model."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from branchmerge.hf_io import tensor_files

    files = tensor_files(folder)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    handles: dict[Path, Any] = {}
    problems = []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name not in files:
                if not (tied and name == "lm_head.weight"):
                    problems.append(f"tensor '{name}' is missing from {folder}")
                continue
            f = handles.get(files[name]) or handles.setdefault(
                files[name], safe_open(str(files[name]), "pt", device="cpu")
            )
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != tuple(t.shape):
                problems.append(
                    f"{files[name]}: '{name}' has shape {sl.get_shape()}, the model {list(t.shape)}"
                )
                continue
            if isinstance(t, DTensor):
                shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
                local = t.to_local()
                if local.numel():
                    local.copy_(sl[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
            else:
                t.copy_(sl[:])
    if problems:
        raise CheckpointError(f"cannot load {folder}: " + "; ".join(problems[:5]))


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def full_tensors(
    named: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, the whole tensor on CPU) on rank 0, (name, None) elsewhere, one tensor at a time.

    Collective when the tensors are sharded (every rank must walk the same names in the same order),
    so at most one unsharded tensor exists per rank at any moment: exporting or writing a 32B model
    never holds more than its largest tensor (the embedding) in full."""
    from torch.distributed.tensor import DTensor

    zero = global_rank() == 0
    for name, t in named:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        yield name, (full.detach().cpu() if zero else None)
        del full


def gradient_storage_numel(model: torch.nn.Module) -> int:
    """Gradient entries this rank holds: its `.grad` shards plus any unsharded gradient FSDP2 keeps
    between micro-batches that skipped gradient synchronisation (outside `.grad`)."""
    total = 0
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad
            total += (g.to_local() if hasattr(g, "to_local") else g).numel()
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None)
        for fp in getattr(group, "fsdp_params", []):
            if fp.unsharded_accumulated_grad is not None:  # kept in the reduce dtype (bf16 compute)
                total += fp.unsharded_accumulated_grad.numel()
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None and unsharded.grad is not None:  # kept as computed
                total += unsharded.grad.numel()
    return total
