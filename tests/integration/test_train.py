"""Branch SFT end to end on pico models through `python train.py` (real processes, real files)."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from branchmerge.errors import ConfigError
from tests.conftest import ROOT

BASE = [
    "model=pico",
    "data=toy_math",
    "data.max_length=256",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "trainer.threads=1",
    "optim.lr=1e-3",
    "logger=csv",
]


def run_train(
    out: Path, toy_world: Path, *overrides: str, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train.py",
        f"paths.output_dir={out}",
        f"paths.toy_dir={toy_world}",
        *BASE,
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").read_text().splitlines()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def grad_norms(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").read_text().splitlines()))
    return [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


# the recipe of the shared single-process run (checkpoint cadence and logger do not change the weights)
SINGLE = ("run_name=single", "trainer.max_steps=6", "fisher.enabled=true", "fisher.last_n_steps=2")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, toy_world) -> Path:
    out = tmp_path_factory.mktemp("single")
    run_train(out, toy_world, *SINGLE, "trainer.checkpoint_every_n_steps=2", "logger=wandb")
    return out / "train" / "single"


def test_run_writes_checkpoints_metrics_and_a_loadable_export(single_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert sorted(p.name for p in (single_run / "checkpoints").iterdir()) == [
        "step-00000004.ckpt",
        "step-00000006.ckpt",  # the final step's, so a crash in the export does not retrain
    ]
    ls = losses(single_run)
    assert len(ls) == 6 and ls[-1] < ls[0]
    rows = list(csv.DictReader((single_run / "logs" / "metrics.csv").read_text().splitlines()))
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/packing_efficiency"} <= set(rows[0])
    assert len(list((single_run / "wandb").glob("offline-run-*"))) == 1  # W&B offline run, syncable later
    stats = json.loads((single_run / "data_stats.json").read_text())
    assert stats["records"] == 120 and 0.5 < stats["packing_efficiency"] <= 1
    export = single_run / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    gen = GenerationConfig.from_pretrained(export)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prov = json.loads((export / "branchmerge.json").read_text())
    assert prov["steps"] == 6 and prov["config"]["data"]["template"] == "chatml"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    with torch.no_grad():  # greedy generation continues with the forward pass's argmax
        first = model(**ids).logits[0, -1].argmax()
    assert out.shape[1] > ids["input_ids"].shape[1] and out[0, ids["input_ids"].shape[1]] == first


def test_fisher_importance_file(single_run):
    from safetensors import safe_open

    fisher = load_file(single_run / "fisher.safetensors")
    exported = weights(single_run)
    assert set(fisher) == set(exported)  # the export's tensor names (pico ties lm_head to the embedding)
    assert all(fisher[k].shape == exported[k].shape and (fisher[k] >= 0).all() for k in fisher)
    assert sum(float(v.sum()) for v in fisher.values()) > 0
    with safe_open(single_run / "fisher.safetensors", "pt") as f:
        assert f.metadata()["steps"] == "2"


def train_in_process(out: Path, toy_world: Path, *overrides: str):
    """The `train` that train.py calls, on the config train.py composes (no process start)."""
    from branchmerge.train.run import train
    from tests.conftest import compose

    run_name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name="))
    common = [f"paths.output_dir={out}", f"paths.toy_dir={toy_world}", *BASE]
    return train(compose("train", [*common, *overrides], run_dir=out / "train" / run_name))


def test_finished_run_is_reused(single_run, toy_world, caplog):
    """In process: a finished run returns before any model or data is loaded."""
    mtimes = {p: p.stat().st_mtime_ns for p in single_run.rglob("*")}
    t0 = time.time()
    with caplog.at_level(logging.INFO, logger="branchmerge.train.run"):
        loss = train_in_process(single_run.parent.parent, toy_world, *SINGLE)
    assert "is finished" in caplog.text and time.time() - t0 < 60
    assert loss == json.loads((single_run / "export" / "branchmerge.json").read_text())["final_loss"]
    assert {p: p.stat().st_mtime_ns for p in single_run.rglob("*")} == mtimes


def test_finished_run_with_another_recipe_is_refused(single_run, toy_world):
    with pytest.raises(ConfigError, match="holds a finished run with a different recipe"):
        train_in_process(single_run.parent.parent, toy_world, *SINGLE, "optim.lr=5e-4")


RESUME = ("trainer.max_steps=12", "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_checkpoints=20")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, toy_world) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run_train(out, toy_world, "run_name=straight", *RESUME)
    return out / "train" / "straight"


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, toy_world, straight_run):
    """A run SIGKILLed right after its step-4 checkpoint resumes and ends bitwise equal to the
    uninterrupted run (the shared `straight_run`, same recipe)."""
    common = RESUME
    cmd = [
        sys.executable,
        "train.py",
        f"paths.output_dir={tmp_path}",
        f"paths.toy_dir={toy_world}",
        *BASE,
        "run_name=killed",
        *common,
    ]
    ckpt = tmp_path / "train" / "killed" / "checkpoints" / "step-00000004.ckpt"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the run never wrote its step-4 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = tmp_path / "train" / "killed"
    assert not (killed / "export").exists()
    proc = run_train(tmp_path, toy_world, "run_name=killed", *common)
    assert "resuming from" in proc.stdout + proc.stderr
    a, b = weights(straight_run), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the loss curve after the resume point is the uninterrupted one
    assert losses(killed)[-2:] == losses(straight_run)[-2:]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path, toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = ("model=pico_untied", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2")
    run_train(tmp_path, toy_world, "run_name=one", *common)
    run_train(tmp_path, toy_world, "run_name=two", "strategy=fsdp2", "trainer.devices=2", *common)
    one, two = losses(tmp_path / "train" / "one"), losses(tmp_path / "train" / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    # the gradients too (a gradient twice too large changes the first losses by a hair only)
    gn1, gn2 = grad_norms(tmp_path / "train" / "one"), grad_norms(tmp_path / "train" / "two")
    assert len(gn1) == 4 and max(abs(a - b) / a for a, b in zip(gn1, gn2)) <= 1e-4
    ckpt = tmp_path / "train" / "two" / "checkpoints" / "step-00000002.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # sharded, one file per rank
    export = tmp_path / "train" / "two" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4
    w1, w2 = weights(tmp_path / "train" / "one"), weights(tmp_path / "train" / "two")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


def test_record_without_assistant_turn(tmp_path, toy_world):
    """Through train.py: the CLI boundary for an error found in the data (exit status 1, the message)."""
    bad = tmp_path / "bad.jsonl"
    good = (toy_world / "data" / "math" / "train.jsonl").read_text().splitlines()[:3]
    row = json.loads(good[0])
    row["messages"] = row["messages"][:1]
    bad.write_text("\n".join([good[0], good[1], json.dumps(row), good[2]]) + "\n")
    proc = run_train(tmp_path, toy_world, "run_name=bad", f"data.train_files=[{bad}]", check=False)
    assert proc.returncode != 0
    assert f"{bad}:3: no assistant turn" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.template=llama3"], "data.template: 'llama3' is not one of ['chatml', 'deepseek_r1']"),
        (
            ["model.path=/nonexistent/model", "model.arch=null"],
            "model folder /nonexistent/model does not exist",
        ),
        (["data.max_length=4096"], "data.max_length=4096 exceeds what model 'pico' can take"),
        (["trainer.global_batch_size=7"], "trainer.global_batch_size=7 is not a multiple"),
        (["+trainer.max_stepz=3"], "trainer.max_stepz: unknown key; did you mean 'trainer.max_steps'?"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, toy_world, overrides, message):
    """In process (the same `train` that train.py calls; the CLI boundary is checked above for a bad
    record, and for a bad config value in test_cli_errors.py)."""
    from branchmerge.train.run import train
    from tests.conftest import compose

    common = [f"paths.output_dir={tmp_path}", f"paths.toy_dir={toy_world}", *BASE, "run_name=bad"]
    with pytest.raises(Exception) as err:
        train(compose("train", [*common, *overrides], run_dir=tmp_path / "train" / "bad"))
    assert message in str(err.value)
    assert not (tmp_path / "train" / "bad" / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [4, 6, 8, 12])
def test_resume_at_any_checkpoint_trains_the_planned_steps(tmp_path, toy_world, straight_run, kill_after):
    """Bug guarded: the step loader's length was the *remaining* steps, and both the checkpoint cadence
    and Lightning's epoch loop compared against it, so a run resumed anywhere but half-way stopped
    early (resumed after step 4 of 12: stopped at 8 and exported as if finished) or never wrote its
    later checkpoints. A run killed right after checkpoint `kill_after` (the state a SIGKILL leaves:
    checkpoints up to that step, no export; 12 = killed during the export) must resume, train exactly
    the planned 12 steps, write every planned checkpoint and end bitwise equal to the uninterrupted run."""
    import shutil

    common = RESUME
    straight, killed = straight_run, tmp_path / "train" / "killed"
    planned = [f"step-{s:08d}.ckpt" for s in (2, 4, 6, 8, 10, 12)]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == planned
    (killed / "checkpoints").mkdir(parents=True)
    for name in planned[: kill_after // 2]:
        shutil.copytree(straight / "checkpoints" / name, killed / "checkpoints" / name) if (
            straight / "checkpoints" / name
        ).is_dir() else shutil.copy2(straight / "checkpoints" / name, killed / "checkpoints" / name)
    proc = run_train(tmp_path, toy_world, "run_name=killed", *common)
    assert f"step-{kill_after:08d}.ckpt" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == planned
    prov = json.loads((killed / "export" / "branchmerge.json").read_text())
    assert prov["steps"] == 12
    resumed = losses(killed) if (killed / "logs" / "metrics.csv").exists() else []
    assert resumed == losses(straight)[kill_after:] and len(resumed) == 12 - kill_after
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fisher_is_taken_from_the_unclipped_gradient(tmp_path, toy_world):
    """Bug guarded: the Fisher accumulated gradients after clipping, so with the recipe's clip the
    importance of a step was rescaled by that step's norm. After one step with a tiny clip the Fisher's
    sum must still equal the squared norm of the raw gradient (the logged, pre-clip grad norm)."""
    run_train(
        tmp_path,
        toy_world,
        "run_name=clip",
        "trainer.max_steps=1",
        "optim.grad_clip=1e-8",
        "fisher.enabled=true",
        "fisher.last_n_steps=1",
        "model=pico_untied",
    )
    run = tmp_path / "train" / "clip"
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").read_text().splitlines()))
    grad_norm = float(next(r["train/grad_norm"] for r in rows if r.get("train/grad_norm")))
    fisher = load_file(run / "fisher.safetensors")
    total = sum(float(v.double().sum()) for v in fisher.values())
    assert grad_norm > 1e-3 and abs(total - grad_norm**2) <= 1e-3 * grad_norm**2
