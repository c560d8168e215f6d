"""Training FLOPs of a decoder LM step and the GPU peaks that turn them into MFU.

    flops = train_flops(shape, doc_lengths)           # one optimizer step's model FLOPs
    mfu = model_flops_utilization(flops, seconds, peak_bf16_flops(torch.cuda.get_device_name()), world)

Model FLOPs, not hardware FLOPs: the forward recomputed by gradient checkpointing and flash-attention's
recomputed scores are not counted (the usual MFU convention, so that MFU compares setups fairly).

Per token, every weight matrix of a matmul costs 2 FLOPs per parameter forward and 4 backward
(input and weight gradients): 6 * N_matmul, where N_matmul counts the decoder's projections and the
LM head (the input embedding is a lookup, not a matmul; a tied head still costs a matmul).

Attention scores and their use: for one document of L tokens and an attention width of
d_attn = n_heads * head_dim, per layer,
    Q K^T : 2 * L^2 * d_attn  FLOPs,   A V : 2 * L^2 * d_attn  FLOPs       (full)
A causal mask needs half of each (L^2 / 2 entries), so the forward costs 2 * L^2 * d_attn and the
backward twice that (dQ, dK from dS; dA, dV from dO), in all
    6 * n_layers * d_attn * L^2   per document and step.
Packed rows whose documents never attend to each other cost Σ_d L_d^2, not L_row^2; rows with plain
packing (cross-document attention) cost L_row^2: pass the spans attention actually runs over.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s per GPU, matched on torch.cuda.get_device_name().
# Sources: NVIDIA data sheets (H100 SXM/PCIe/NVL: 1,979 / 1,513 / 1,671 TFLOPS with sparsity; H200 and
# H200 NVL: 1,979 / 1,671 with sparsity; A100 40/80 GB: 312 dense; L40S: 733 with sparsity; L40: 362 with
# sparsity; A10: 125 dense; HGX B200: 4.5 PFLOPS with sparsity per GPU), NVIDIA's H20 specification
# (148 TFLOPS FP16/BF16 dense, 296 INT8), the Ada architecture whitepaper (RTX 4090: 165.2 TFLOPS BF16 with
# FP32 accumulate, dense). H800 and A800 are export variants with the H100's and A100's compute (only
# NVLink is cut). Dense = the sparse figure / 2. Order matters: the first matching pattern wins.
# Not listed on purpose: A10G (public figures disagree, 70 vs 125 TFLOPS), RTX 4090 D, consumer cards.
_PEAKS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250e12),
    (r"\bGH200\b", 989.4e12),
    (r"\bH200\b.*\bNVL\b", 835.5e12),
    (r"\bH200\b", 989.4e12),
    (r"\bH100\b.*\bNVL\b", 835.5e12),
    (r"\bH100\b.*\bPCIE\b", 756.5e12),
    (r"\bH100\b", 989.4e12),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 ..."
    (r"\bH800\b.*\bPCIE\b", 756.5e12),
    (r"\bH800\b", 989.4e12),
    (r"\bH20\b", 148e12),  # \b keeps "H200" out
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362.05e12),
    (r"\bL40\b", 181.05e12),
    (r"\bA10\b", 125e12),  # \b keeps "A100" and "A10G" out
    (r"\bRTX 4090\b(?!\s*D\b)", 165.2e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU named like torch.cuda.get_device_name(), or None if unknown."""
    name = " " + re.sub(r"[-_]", " ", device_name.upper()) + " "
    for pattern, peak in _PEAKS:
        if re.search(pattern, name):
            return peak
    return None


@dataclass(frozen=True)
class ModelShape:
    """What FLOPs and memory depend on: a Qwen2-style decoder (GQA, biased q/k/v, SwiGLU MLP, RMSNorm)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # None = hidden // heads
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def d_head(self) -> int:
        return self.head_dim

    @property
    def d_attn(self) -> int:
        """Width of the attention (n_heads * head_dim): the query and output projections' inner size."""
        return self.heads * self.d_head

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.d_head

    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, q/k/v biases, two RMSNorm weights)."""
        h, i = self.hidden, self.intermediate
        attn = h * self.d_attn * 2 + h * self.d_kv * 2
        bias = (self.d_attn + 2 * self.d_kv) if self.qkv_bias else 0
        return attn + bias + 3 * h * i + 2 * h

    def layer_matmul_params(self) -> int:
        h = self.hidden
        return h * self.d_attn * 2 + h * self.d_kv * 2 + 3 * h * self.intermediate

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, untied LM head."""
        return self.embedding_params() * (1 if self.tied else 2) + self.hidden

    def n_params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def matmul_params(self) -> int:
        """N_matmul: every weight a token's forward multiplies by (decoder projections + LM head)."""
        return self.layers * self.layer_matmul_params() + self.embedding_params()


def attention_flops(shape: ModelShape, spans: Iterable[int], causal: bool = True) -> float:
    """Training (forward + backward) FLOPs of attention scores over spans of lengths L_s:
    6 * n_layers * d_attn * Σ_s L_s^2 when causal, twice that without a mask."""
    sq = sum(int(n) ** 2 for n in spans)
    return (6.0 if causal else 12.0) * shape.layers * shape.d_attn * sq


def matmul_flops(shape: ModelShape, tokens: int) -> float:
    """Training FLOPs of the weight matmuls: 6 * N_matmul * tokens."""
    return 6.0 * shape.matmul_params() * tokens


def train_flops(shape: ModelShape, doc_lengths: Iterable[int], causal: bool = True) -> float:
    """Model FLOPs of one training step over documents (or attention spans) of the given lengths:
    6 * N_matmul * Σ L_d + 6 * n_layers * d_attn * Σ L_d^2 (causal)."""
    lengths = [int(n) for n in doc_lengths]
    return matmul_flops(shape, sum(lengths)) + attention_flops(shape, lengths, causal)


def model_flops_utilization(flops: float, seconds: float, peak: float | None, world: int = 1) -> float | None:
    """MFU = flops / (seconds * peak * world); None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * peak * world)


def shape_from_config(config) -> ModelShape:
    """ModelShape of a transformers config (Qwen2/Llama-style attributes)."""
    heads = config.num_attention_heads
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        qkv_bias=getattr(config, "model_type", "qwen2") == "qwen2",
    )


def train_flops_per_token(shape: ModelShape, doc_lengths: Iterable[int], causal: bool = True) -> float:
    """train_flops / tokens: what tokens/s multiplies into FLOP/s for a step of these documents."""
    lengths = [int(n) for n in doc_lengths]
    return train_flops(shape, lengths, causal) / max(1, sum(lengths))
