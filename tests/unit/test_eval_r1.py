"""Evaluation settings for the real models: dtype `auto`, tensor x data parallel layouts on vLLM, and
grading generations whose prompt opened the think block (R1-family templates)."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import EvalRunnerConfig
from branchmerge.eval.harness import (
    build_lm,
    check_gpus,
    lm_args,
    reopen_generations,
    resolve_dtype,
    unclosed,
)
from branchmerge.verify.graders import grade_math
from tests.r1_chat import pico_r1, r1_tokenizer

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def _settings(model_path, **kw):
    """EvalRunnerConfig's settings (defaults filled in) plus the model folder, as evaluate.py sees them."""
    return OmegaConf.create(
        {**OmegaConf.to_container(validate(kw, EvalRunnerConfig)), "model_path": str(model_path)}
    )


def _runner(tmp_path, checkpoint_dtype: str | None = "bfloat16", **kw):
    config = {"model_type": "qwen2"}
    if checkpoint_dtype:
        config["torch_dtype"] = checkpoint_dtype
    (tmp_path / "config.json").write_text(json.dumps(config))
    return _settings(tmp_path, **kw)


def test_dtype_auto_is_the_checkpoints_on_gpus_and_float32_on_cpu(tmp_path):
    """Bug planted: the old default float32 -> a bf16 32B checkpoint runs in fp32 on vLLM."""
    assert resolve_dtype(_runner(tmp_path, backend="vllm")) == "bfloat16"
    assert resolve_dtype(_runner(tmp_path, backend="hf", device="cuda")) == "bfloat16"
    assert resolve_dtype(_runner(tmp_path)) == "float32"  # hf on CPU: toy scores stay as they were
    assert resolve_dtype(_runner(tmp_path, backend="vllm", dtype="float16")) == "float16"  # explicit wins
    assert resolve_dtype(_runner(tmp_path, None, backend="vllm")) == "float32"  # config.json says nothing
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))  # transformers >= 4.56 key
    assert resolve_dtype(_settings(tmp_path, backend="vllm")) == "float16"


def test_vllm_model_args_carry_both_parallel_sizes(tmp_path):
    """Bug planted: data_parallel_size left out of the VLLM arguments -> 4 x TP2 silently runs one TP2."""
    cfg = _runner(tmp_path, backend="vllm", tensor_parallel_size=2, data_parallel_size=4, seed=9)
    args = lm_args(cfg)
    assert (args["tensor_parallel_size"], args["data_parallel_size"]) == (2, 4)
    assert (args["dtype"], args["seed"], args["batch_size"]) == ("bfloat16", 9, "auto")
    assert "data_parallel_size" not in lm_args(_runner(tmp_path))  # HFLM takes no such argument
    check_gpus(cfg, visible=8, has_ray=True)  # 2 x 4 = 8 GPUs: fits


@pytest.mark.parametrize(
    ("kw", "visible", "ray", "message"),
    [
        (
            {"backend": "vllm", "tensor_parallel_size": 4, "data_parallel_size": 4},
            8,
            True,
            "tensor_parallel_size=4 x data_parallel_size=4 = 16 GPUs, but 8 are visible "
            "(CUDA_VISIBLE_DEVICES): lower one, e.g. data_parallel_size=2",
        ),
        (
            {"backend": "vllm", "tensor_parallel_size": 8},
            4,
            True,
            "tensor_parallel_size=8 x data_parallel_size=1 = 8 GPUs, but 4 are visible",
        ),
        ({"backend": "vllm", "data_parallel_size": 2}, 8, False, "data_parallel_size=2 needs ray"),
        ({"data_parallel_size": 2}, 0, True, "need backend=vllm"),
        ({"backend": "vllm", "data_parallel_size": 0}, 8, True, "must be at least 1"),
    ],
)
def test_parallel_layouts_that_cannot_run_are_refused(tmp_path, kw, visible, ray, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_gpus(_runner(tmp_path, **kw), visible, ray)


class ScriptedLM:
    """lm-eval's generate_until surface, answering each request with the next scripted text."""

    def __init__(self, outputs: list[str]):
        self.outputs = outputs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.outputs[: len(requests)]


def _requests(prompt: str, k: int) -> list[Instance]:
    return [Instance("generate_until", {}, (prompt, {"until": []}), i) for i in range(k)]


def test_cut_off_reasoning_is_not_graded_on_its_boxed_guess():
    """An R1 generation that hit max_gen_toks inside its reasoning. Bug planted: grading the raw output
    (no reopen_generations) -> the guess \\boxed{4} inside the unfinished reasoning counts as right."""
    prompt = r1_tokenizer().apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    outs = ["Maybe \\boxed{4}? Let me check 2+2 again", "2+2=4.\n</think>\n\n\\boxed{4}"]
    got = reopen_generations(ScriptedLM(outs)).generate_until(_requests(prompt, 2))
    assert got == ["<think>\n" + o for o in outs]
    assert [grade_math(g, "4") for g in got] == [False, True]
    assert [unclosed(g) for g in got] == [True, False]
    assert grade_math(outs[0], "4") is True  # what was graded before the fix
    chatml = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert reopen_generations(ScriptedLM(outs)).generate_until(_requests(chatml, 2)) == outs  # untouched


@pytest.mark.slow
def test_build_lm_reopens_generations_of_a_real_hf_model(tmp_path):
    """lm-eval's HFLM on a pico model with the R1 template, through build_lm. Bug planted: build_lm
    returning HFLM unwrapped -> the generation starts without `<think>` and reads as answered."""
    pico_r1(tmp_path)
    lm = build_lm(_settings(tmp_path, batch_size=1))
    prompt = lm.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    (out,) = lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 4}), 0)]
    )
    assert out.startswith("<think>\n") and unclosed(out)
