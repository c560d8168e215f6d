"""The paper's 32B recipes on CPU, shaped like the real thing: `+experiment=math_branch` (and code,
science, mixture) with only the model size, sequence length, world size (2 gloo ranks, accumulation as
in the recipe) and step count overridden; the model is a pico Qwen2 with R1-Distill-Qwen-32B's
vocabulary layout (152,064 untied rows) and tokenizer layout (its special tokens at 151643..151664, no
ChatML tokens), saved in bf16 like the hub checkpoint and loaded through the same `model.path` code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.r1_chat import R1_DISTILL_ROWS, pico_r1_distill

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# (experiment, global batch on 2 ranks keeping the recipe's accumulation, accumulation)
RECIPES = [("math_branch", 6, 3), ("code_branch", 6, 3), ("science_branch", 2, 1), ("mixture", 6, 3)]


@pytest.fixture(scope="module")
def r1_setup(tmp_path_factory, toy_world) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("r1")
    pico_r1_distill(root / "R1-Distill-pico")
    for domain in ("math", "code", "science"):
        dst = root / "data" / "branches" / domain
        dst.mkdir(parents=True)
        shutil.copy(toy_world / "data" / domain / "train.jsonl", dst / "train.jsonl")
    return root / "R1-Distill-pico", root / "data"


def run_recipe(experiment: str, model: Path, data: Path, out: Path, global_batch: int):
    cmd = [
        sys.executable,
        "train.py",
        f"+experiment={experiment}",
        f"model.path={model}",  # the model size
        "data.max_length=512",  # the sequence length
        "trainer.accelerator=cpu",  # the world: 2 gloo ranks on CPU
        "trainer.precision=32-true",
        "trainer.devices=2",
        "trainer.num_nodes=1",
        f"trainer.global_batch_size={global_batch}",  # 1 sequence x the recipe's accumulation x 2 ranks
        "trainer.max_steps=2",
        "trainer.threads=1",
        "trainer.progress_bar=false",
        "data.num_proc=1",
        "logger=csv",
        f"paths.data_dir={data}",
        f"paths.output_dir={out}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{experiment} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize(("experiment", "global_batch", "accumulation"), RECIPES)
def test_paper_recipe_runs_on_an_r1_distill_shaped_proxy(
    r1_setup, tmp_path, experiment, global_batch, accumulation
):
    """Bug guarded: the r1_* data configs use ChatML, which R1-Distill's tokenizer lacks, so every rank
    stopped at start-up; the export must carry a tokenizer whose `<|im_end|>` (added in a padded row,
    as the paper's SFT stack did) is the EOS that generation stops on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir, data_dir = r1_setup
    run_recipe(experiment, model_dir, data_dir, tmp_path, global_batch)
    assert (
        "added ['<|im_end|>'] to the tokenizer" in (tmp_path / "train" / experiment / "train.log").read_text()
    )
    run = tmp_path / "train" / experiment
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["accumulation"] == accumulation
    export = run / "export"
    prov = json.loads((export / "branchmerge.json").read_text())
    assert prov["steps"] == 2 and prov["world_size"] == 2
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    gen = GenerationConfig.from_pretrained(export)
    assert model.get_input_embeddings().weight.shape[0] == R1_DISTILL_ROWS == model.lm_head.weight.shape[0]
    assert not model.config.tie_word_embeddings and model.dtype == torch.bfloat16
    # <|im_end|> is the last token, in a padded row (transformers loads R1-Distill's folder as a Qwen2
    # tokenizer, which adds <|endoftext|> as its unknown token first: 151,666 tokens before ChatML's)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == len(tok) - 1 and 151665 <= im_end < R1_DISTILL_ROWS and gen.eos_token_id == im_end
    assert tok.eos_token == "<|im_end|>" and tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [
        im_end
    ]
    assert tok.convert_tokens_to_ids(["<think>", "<｜end▁of▁sentence｜>"]) == [
        151648,
        151643,
    ]  # R1's ids kept
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, generation_config=gen)
    with torch.no_grad():  # greedy generation continues with the forward pass's argmax
        first = model(**ids).logits[0, -1].argmax()
    assert out.shape[1] > ids["input_ids"].shape[1] and out[0, ids["input_ids"].shape[1]] == first
    # the weights moved from the checkpoint's: training ran on the loaded model
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    delta = model.model.layers[0].mlp.up_proj.weight.float() - base.model.layers[0].mlp.up_proj.weight.float()
    assert float(delta.abs().max()) > 0
