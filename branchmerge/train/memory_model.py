"""Per-GPU memory of one training step under FSDP2 (or DDP / one process), in bytes, by component and phase.

    mem = memory(MemoryInputs(shape=..., shards=32, fsdp=True, tokens=16384, ...))
    mem.components   {"params (fp32 master, sharded)": bytes, ...}
    mem.phases       {"backward start": bytes, "loss": bytes, "root reduce-scatter": bytes}
    mem.total_bytes  max(phases) * (1 + fragmentation) + CUDA context;   mem.fits

Notation: N parameters (N_root = embedding + final norm + untied LM head, N_l = one decoder layer),
S shards (the world size under FSDP2, else 1), T tokens per micro-batch (micro batch x max_length),
h hidden, i intermediate, d_kv = kv_heads * head_dim, V vocabulary rows, b compute bytes (2 for bf16),
m master bytes (4: FSDP2 builds fp32 shards from a float32 meta init).

Static (whole step):  params m N/S,  grads m N/S (reduce-scattered every micro-batch, so the shard size),
    AdamW exp_avg + exp_avg_sq 2 m N/S.
FSDP2 all-gathers:  the root group (embedding, norm, LM head) stays unsharded in b bytes for the whole
    step (FSDP2 does not reshard the root after forward): b N_root.  Layers in flight during backward:
    two gathered (current + prefetched) b 2 N_l, one layer's unsharded grads b N_l and its fp32
    reduce-scatter input 4 N_l.
Activations with checkpointing per decoder layer:  every layer's input b T h, plus one layer
    recomputed for its backward: saved tensors + backward transients, per token
        saved     = (12 + 4b) h + 2b d_kv + 4b i + 4 heads + 8
        transient = b (2 i + 5 h)
    (saved: counted exactly by a test with saved_tensors_hooks on a Qwen2 layer, sdpa/flash kernel, fp32
    RMSNorm internals; transient: an upper bound of the measured backward peak on pico shapes).
    Without checkpointing every layer keeps its saved tensors.
Loss (cross-entropy over V in chunks of C tokens, C = T when 0):  12 C V (logits in b, their fp32 copy,
    fp32 log-softmax and its gradient; measured 12.0-12.8 bytes per logit on CPU) + b V h (a chunk's
    LM-head gradient before it is added) + 4 b T h (final hidden states, their label-position copy, their
    gradient and a chunk's slice-backward buffer); the
    unsharded LM-head gradient b V h lives from the loss to the end of the backward.
Root reduce-scatter (end of backward):  root grads b N_root + fp32 reduce-scatter input 4 N_root.
"""

from __future__ import annotations

from dataclasses import dataclass

from branchmerge.train.flops import ModelShape

GiB = 1024**3
LOSS_BYTES_PER_LOGIT = 12


@dataclass(frozen=True)
class MemoryInputs:
    shape: ModelShape
    shards: int  # FSDP2 world size; 1 = unsharded
    fsdp: bool
    tokens: int  # T: tokens per micro-batch (micro_batch_size x max_length)
    compute_bytes: int = 2  # b
    master_bytes: int = 4  # m
    gradient_checkpointing: bool = True
    loss_chunk_tokens: int = 4096  # 0 = the whole row at once
    ddp: bool = False
    card_bytes: float = 79.1 * GiB
    context_bytes: float = 2.0 * GiB
    fragmentation: float = 0.10
    on_gpu: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    components: dict[str, float]
    phases: dict[str, float]
    fragmentation_bytes: float
    context_bytes: float
    card_bytes: float
    on_gpu: bool

    @property
    def peak_allocated(self) -> float:
        return max(self.phases.values())

    @property
    def total_bytes(self) -> float:
        return self.peak_allocated + self.fragmentation_bytes + self.context_bytes

    @property
    def fits(self) -> bool:
        return not self.on_gpu or self.total_bytes <= self.card_bytes


def layer_saved_bytes_per_token(shape: ModelShape, b: int) -> float:
    """Bytes one decoder layer saves for its backward, per token (see the module docstring)."""
    return (12 + 4 * b) * shape.hidden + 2 * b * shape.d_kv + 4 * b * shape.intermediate + 4 * shape.heads + 8


def layer_transient_bytes_per_token(shape: ModelShape, b: int) -> float:
    return b * (2 * shape.intermediate + 5 * shape.hidden)


def loss_peak_bytes(shape: ModelShape, tokens: int, chunk: int, b: int) -> float:
    c = min(chunk or tokens, tokens)
    return (
        LOSS_BYTES_PER_LOGIT * c * shape.vocab
        + b * shape.vocab * shape.hidden
        + 4 * b * tokens * shape.hidden
    )


def static_bytes(x: MemoryInputs) -> dict[str, float]:
    n, m = x.shape.n_params(), x.master_bytes
    per = -(-n // x.shards)  # ceil: FSDP2 pads each tensor's dim 0 to a multiple of the world size
    where = "sharded" if x.shards > 1 else "unsharded"
    out = {
        f"params ({m * 8}-bit master, {where})": m * per,
        f"grads ({m * 8}-bit, {where})": m * per,
        f"AdamW exp_avg + exp_avg_sq ({where})": 2 * m * per,
    }
    if x.ddp:
        out["DDP gradient buckets"] = m * n
    return out


def memory(x: MemoryInputs) -> MemoryPlan:
    s, b, t = x.shape, x.compute_bytes, x.tokens
    comp = static_bytes(x)
    if x.fsdp:
        comp["root params all-gathered (embed, norm, head)"] = b * s.root_params()
        comp["layers in flight (2 gathered + grads + RS buf)"] = (2 * b + b + 4) * s.layer_params()
    elif b < x.master_bytes:  # autocast keeps a low-precision copy of every weight for the forward
        comp["autocast weight copies"] = b * s.n_params()
    saved = layer_saved_bytes_per_token(s, b) * t
    if x.gradient_checkpointing:
        comp["checkpointed layer inputs (all layers)"] = s.layers * b * t * s.hidden
        comp["one layer recomputed for backward"] = saved + layer_transient_bytes_per_token(s, b) * t
    else:
        comp["saved activations (all layers, no checkpointing)"] = s.layers * saved
        comp["one layer's backward transients"] = layer_transient_bytes_per_token(s, b) * t
    comp["loss peak (chunked cross-entropy)"] = loss_peak_bytes(s, t, x.loss_chunk_tokens, b)
    comp["LM-head grad (unsharded, until backward ends)"] = b * s.embedding_params()
    comp["root grads + fp32 reduce-scatter input"] = (b + 4) * s.root_params()
    static = sum(v for k, v in comp.items() if k in static_bytes(x))
    gathered = comp.get("root params all-gathered (embed, norm, head)", 0) + comp.get(
        "autocast weight copies", 0
    )
    acts = next(v for k, v in comp.items() if k.startswith(("checkpointed", "saved activations")))
    layer = next(v for k, v in comp.items() if k.startswith(("one layer", "one layer's")))
    flight = comp.get("layers in flight (2 gathered + grads + RS buf)", 0)
    head_grad = comp["LM-head grad (unsharded, until backward ends)"]
    phases = {
        "loss": static + gathered + acts + comp["loss peak (chunked cross-entropy)"] + head_grad,
        "backward start": static + gathered + acts + layer + flight + head_grad,
        "root reduce-scatter": static + gathered + comp["root grads + fp32 reduce-scatter input"],
    }
    peak = max(phases.values())
    return MemoryPlan(
        comp,
        phases,
        x.fragmentation * peak if x.on_gpu else 0.0,
        x.context_bytes if x.on_gpu else 0.0,
        x.card_bytes,
        x.on_gpu,
    )
