"""FLOPs of a training step and GPU peaks: hand-worked values, and a real Qwen2 counted by torch."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from branchmerge.train.flops import (
    ModelShape,
    attention_flops,
    matmul_flops,
    model_flops_utilization,
    peak_bf16_flops,
    shape_from_config,
    train_flops,
    train_flops_per_token,
)

TINY = ModelShape(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, vocab=10, tied=False)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H800", 989.4),
        ("NVIDIA H800 PCIe", 756.5),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A800-SXM4-80GB", 312.0),
        ("NVIDIA A800 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA B200", 2250.0),
    ],
)
def test_peak_matches_the_exact_card(name, tflops):
    """Bug guarded: matching by substring (the old table) gave the H100 PCIe/NVL the SXM's 989 TFLOP/s,
    the H200 NVL the SXM's, and the H800/A800/H20 nothing."""
    assert peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    "name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "Tesla T4", "AMD Instinct MI300X", ""]
)
def test_unknown_card_has_no_peak(name):
    """Bug guarded: "A10G" or "RTX 4090 D" taking the A10's or the 4090's peak by a loose match."""
    assert peak_bf16_flops(name) is None


def test_hand_worked_parameters_and_flops():
    """h 4, i 8, 2 layers, 2 heads / 1 KV head (head_dim 2), V 10, untied, q/k/v biases.
    layer: q 16 + k 8 + v 8 + o 16 = 48 matmul, biases 4+2+2, MLP 3*4*8 = 96, norms 8 -> 160
    model: 2*160 + embed 40 + head 40 + final norm 4 = 404;  N_matmul = 2*(48+96) + head 40 = 328
    documents [3, 5]: 6*328*8 = 15744 matmul + 6*2*4*(9+25) = 1632 attention (causal) = 17376."""
    assert TINY.layer_params() == 160 and TINY.n_params() == 404 and TINY.matmul_params() == 328
    assert matmul_flops(TINY, 8) == 15744
    assert attention_flops(TINY, [3, 5]) == 1632
    assert attention_flops(TINY, [3, 5], causal=False) == 3264
    assert train_flops(TINY, [3, 5]) == 17376
    assert train_flops_per_token(TINY, [3, 5]) == 17376 / 8


def test_packed_documents_cost_their_own_attention_not_the_rows():
    """Bug guarded: attention FLOPs from the row length (16k^2) for a row of per-document attention:
    four 4k documents cost a quarter of one 16k document's attention."""
    four = attention_flops(TINY, [4096] * 4)
    one = attention_flops(TINY, [16384])
    assert four == pytest.approx(one / 4)


def test_32b_parameter_count_is_the_released_models():
    """R1-Distill-Qwen-32B: 32,763,876,352 parameters (its safetensors index)."""
    s = ModelShape(5120, 27648, 64, 40, 8, 152064, tied=False)
    assert s.n_params() == 32_763_876_352


def test_mfu():
    assert model_flops_utilization(989.4e12 * 0.5 * 8 * 2.0, 2.0, 989.4e12, world=8) == pytest.approx(0.5)
    assert model_flops_utilization(1e15, 1.0, None) is None


@pytest.mark.parametrize("tied", [True, False])
def test_formula_equals_torchs_count_on_a_real_qwen2(tied):
    """torch's FlopCounterMode over forward + backward of a pico Qwen2 (eager attention, so the scores
    are plain matmuls it counts at full L^2) equals 6 N_matmul T + 12 n_layers d_attn Σ L^2 exactly,
    documents run one by one. Bug guarded: a wrong N_matmul (embedding counted, tied head dropped) or
    a wrong attention factor."""
    from torch.utils.flop_counter import FlopCounterMode

    config = Qwen2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    shape = shape_from_config(config)
    assert shape.n_params() == sum(p.numel() for p in model.parameters())
    docs = [7, 19, 12]
    counter = FlopCounterMode(display=False)
    with counter:
        for n in docs:
            ids = torch.randint(0, 256, (1, n))
            model(ids, use_cache=False).logits.float().sum().backward()
    expected = matmul_flops(shape, sum(docs)) + attention_flops(shape, docs, causal=False)
    assert counter.get_total_flops() == expected
    assert train_flops(shape, docs) == expected - attention_flops(shape, docs, causal=False) / 2
