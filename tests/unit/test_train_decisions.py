"""Decisions of the training path that only a GPU cluster would exercise, checked as logic on CPU."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, compose


def _cfg(*overrides: str):
    from branchmerge.config import validate
    from branchmerge.config.schema import TrainConfig

    return validate(compose("train", ["logger=csv", *overrides]), TrainConfig)


def test_collective_timeout_is_a_setting():
    """Bug guarded: the process group used Lightning's default 30-minute timeout, so ranks waiting while
    one rank loaded or wrote a 65 GB model died; strategy.timeout_s reaches the process group."""
    from branchmerge.train.run import make_strategy

    cfg = _cfg("strategy=fsdp2", "trainer.devices=2", "strategy.timeout_s=7200")
    assert make_strategy(cfg, on_gpu=False)._timeout == timedelta(seconds=7200)
    cfg = _cfg("strategy=ddp", "trainer.devices=2", "strategy.timeout_s=60")
    assert make_strategy(cfg, on_gpu=False)._timeout == timedelta(seconds=60)


def test_cpu_offload_is_refused_with_the_reason():
    """Bug guarded: strategy.cpu_offload=true always failed deep inside Lightning after the model was
    built; it is refused up front, naming the setting and the alternative."""
    from branchmerge.train.run import make_strategy

    with pytest.raises(ValueError, match=r"strategy.cpu_offload=true is not supported.*trainer.num_nodes"):
        make_strategy(_cfg("strategy=fsdp2", "trainer.devices=2", "strategy.cpu_offload=true"), on_gpu=False)


@pytest.mark.parametrize(
    ("installed", "device", "want"),
    [(True, "cuda", "flash_attention_2"), (False, "cuda", "sdpa"), (True, "cpu", "sdpa")],
)
def test_attention_is_chosen_for_the_training_device(monkeypatch, installed, device, want):
    """Bug guarded: under FSDP2, rank 0 built the model on CPU (so `auto` resolved to sdpa) and the other
    ranks hard-coded sdpa: flash-attention was never used and packed 16k rows built a 16k x 16k mask."""
    import importlib.util

    from branchmerge.train.run import check_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: object() if n == "flash_attn" and installed else real(n, *a),
    )
    cfg = _cfg("+experiment=code_branch", "trainer.devices=2")
    assert check_attention(cfg, on_gpu=device == "cuda") == want


def test_packed_micro_batches_above_one_are_refused_on_flash_attention(monkeypatch):
    """Bug guarded: flash-attention's per-document path reads boundaries from position_ids for a single
    row only; two packed rows per micro-batch would silently attend across documents."""
    import importlib.util

    from branchmerge.train.run import check_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a)
    )
    with pytest.raises(ValueError, match="trainer.micro_batch_size=2 with packed rows on flash_attention_2"):
        check_attention(_cfg("+experiment=code_branch", "trainer.micro_batch_size=2"), on_gpu=True)
    # plain packing (math: attention over the whole row) has no document boundaries to lose
    assert check_attention(_cfg("+experiment=math_branch", "trainer.micro_batch_size=2"), on_gpu=True)


def test_partial_checkpoints_are_removed_by_global_rank_zero_only(tmp_path):
    """Bug guarded: clean-up ran where LOCAL_RANK == 0 (once per node, or on every rank when unset) on
    storage all nodes share, racing with rank 0's writes; only the global rank 0 removes anything."""
    from branchmerge.train.checkpoint import AtomicCheckpoint

    (tmp_path / "step-00000004.ckpt.tmp").mkdir()
    cb = AtomicCheckpoint(tmp_path, 2, 2)
    barrier = SimpleNamespace(barrier=lambda: None)
    cb.setup(SimpleNamespace(is_global_zero=False, strategy=barrier), None, "fit")
    assert (tmp_path / "step-00000004.ckpt.tmp").exists()
    cb.setup(SimpleNamespace(is_global_zero=True, strategy=barrier), None, "fit")
    assert not (tmp_path / "step-00000004.ckpt.tmp").exists()


def test_paper_recipes_keep_fisher_off():
    """Bug guarded: the math branch computed a full fp32 Fisher at 32B by default (~131 GB per rank)."""
    for exp in ("math_branch", "code_branch", "science_branch", "mixture"):
        assert _cfg(f"+experiment={exp}", "trainer.devices=2").fisher.enabled is False, exp


def test_optimizer_uses_multi_tensor_kernels():
    """Bug guarded: AdamW ran with foreach=False, a Python loop over every parameter tensor per step."""
    import torch

    from branchmerge.train.schedule import build_optimizer

    params = [("w", torch.nn.Parameter(torch.ones(3, 3))), ("norm.b", torch.nn.Parameter(torch.ones(3)))]
    opt, _ = build_optimizer(params, _cfg().optim, 10)
    assert opt.defaults["foreach"] is True


def test_version_floors_match_the_apis_used():
    """Bug guarded: pyproject allowed torch < 2.6 (no public fully_shard) and transformers < 4.56 (no
    `dtype=` in from_pretrained), both of which the code calls."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (ROOT / "pyproject.toml").read_text()
    deps = {
        Requirement(d).name: Requirement(d)
        for d in re.findall(r'^  "((?:torch|transformers)[<>=].*)",$', text, re.M)
    }
    assert not deps["torch"].specifier.contains(Version("2.5.1")) and deps["torch"].specifier.contains(
        Version("2.6.0")
    )
    assert not deps["transformers"].specifier.contains(Version("4.55.0"))
    assert deps["transformers"].specifier.contains(Version("4.56.0"))
    assert (
        Path(ROOT / "branchmerge" / "train" / "parallel.py")
        .read_text()
        .count("from torch.distributed.fsdp import")
        >= 1
    )


def test_missing_template_token_error_names_both_choices(tmp_path):
    """Bug guarded: R1-Distill's tokenizer has no ChatML end-of-turn token and the only message said to
    pick another template; it now names the setting that adds the token and the model's own template."""
    from branchmerge.data.tokenize import add_template_tokens, check_template_tokens
    from tests.r1_chat import R1_DISTILL_ROWS, r1_distill_tokenizer

    tok = r1_distill_tokenizer()
    with pytest.raises(ValueError, match=r"data.add_template_tokens=true.*data.template=deepseek_r1"):
        check_template_tokens(tok, "chatml")
    check_template_tokens(tok, "deepseek_r1")  # the model's own template needs nothing added
    with pytest.raises(ValueError, match="only 151665 embedding rows"):
        add_template_tokens(tok, "chatml", vocab_rows=151665)
    assert add_template_tokens(tok, "chatml", vocab_rows=R1_DISTILL_ROWS) == ["<|im_end|>"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151665 and tok.eos_token == "<|im_end|>"
    check_template_tokens(tok, "chatml")
