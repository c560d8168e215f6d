"""The study's units of work, each one real entry-point command (`train.py`, `merge.py`, `evaluate.py`)
run as its own one-thread process, plus the snapshot export that turns one branch run's periodic
checkpoints into HF folders at the intermediate step counts.

Snapshots. A branch run of T steps has a constant lr after a fixed W warmup steps (warmup_ratio is set
to (W - 1/2) / T, so ceil(ratio * T) = W whatever T), and its data order is a function of (seed, epoch)
only. Its checkpoint at step s < T therefore holds the weights a separate run of s steps ends with, as
long as s stays inside the first epoch (`check_snapshot_steps`); tests/integration/test_toy_regime.py
compares the two tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DONE = "done.json"  # a finished job's marker: what it ran and how long it took
# Held by any model work the runner does in its own process (its worker threads): transformers builds
# a model under torch's process-wide default dtype (set, then restored), so a bf16 and an fp32 model
# built at once in two threads can leave either, or the process, in the other's dtype.
IN_PROCESS_MODELS = threading.Lock()


def warmup_ratio(warmup_steps: int, total_steps: int) -> float:
    """The ratio that gives exactly `warmup_steps` warmup steps in a run of `total_steps`:
    ceil(ratio * T) = ceil(W - 1/2 ± ulp) = W (schedule.lr_lambda rounds the ratio up)."""
    if not 0 < warmup_steps <= total_steps:
        raise ValueError(f"--warmup-steps {warmup_steps} must lie in 1..{total_steps} (the shortest run)")
    ratio = (warmup_steps - 0.5) / total_steps
    assert math.ceil(ratio * total_steps) == warmup_steps
    return ratio


def env_one_thread() -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def run_logged(args: list[str], log: Path) -> float:
    """`python <args>` from the repo root, one thread, output to `log`; seconds taken. A failure raises
    with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env_one_thread(), stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        raise RuntimeError(f"failed: python {' '.join(args)}\n--- {log} ---\n{log.read_text()[-3000:]}")
    return time.time() - t0


def is_done(folder: Path) -> bool:
    return (folder / DONE).exists()


def mark_done(folder: Path, **info) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(folder / DONE)


# ---- train ---------------------------------------------------------------------------------------
def train_args(
    *,
    experiment: str,
    base: Path,
    run_dir: Path,
    lr: float,
    total_steps: int,
    every: int,
    warmup_steps: int,
    seed: int,
    toy_dir: Path,
    output_dir: Path,
    extra: list[str],
) -> list[str]:
    """`train.py` for one branch (or the mixture) from `base`: lr constant after `warmup_steps`,
    a checkpoint every `every` steps, all of them kept; `seed` also reseeds the data order."""
    return [
        "train.py",
        f"+experiment={experiment}",
        f"model.path={base}",  # whichever model entry the branch config names
        f"paths.toy_dir={toy_dir}",
        f"paths.output_dir={output_dir}",
        f"hydra.run.dir={run_dir}",
        f"run_name={run_dir.name}",
        f"optim.lr={lr}",
        "optim.schedule=constant_with_warmup",
        f"optim.warmup_ratio={warmup_ratio(warmup_steps, total_steps)!r}",
        f"trainer.max_steps={total_steps}",
        f"trainer.checkpoint_every_n_steps={every}",
        "trainer.keep_last_checkpoints=0",
        "trainer.threads=1",
        "trainer.progress_bar=false",
        "logger=csv",
        f"seed={seed}",
        f"data.shuffle_seed={seed}",
        *extra,
    ]


def check_snapshot_steps(run_dir: Path, steps: list[int]) -> None:
    """An intermediate checkpoint equals a shorter run only inside the first epoch (a run's epoch length
    is the fewest full batches of any epoch it reaches, so it can depend on the run's length)."""
    stats = json.loads((run_dir / "data_stats.json").read_text())
    per_epoch, total = stats["steps_per_epoch"], stats["total_steps"]
    late = [s for s in steps if s < total and s > per_epoch]
    if late:
        raise ValueError(
            f"{run_dir}: snapshots at steps {late} lie past the first epoch ({per_epoch} steps), where a "
            "checkpoint no longer equals a shorter run; use step counts <= that or train them separately"
        )


def export_snapshot(run_dir: Path, step: int, out_dir: Path) -> Path:
    """The HF folder of `run_dir`'s checkpoint at `step` (the final export for the last step), written
    with the run's own export code: same tensors, dtype, config and tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from branchmerge.train.checkpoint import checkpoint_path
    from branchmerge.train.export import export_hf, export_plan

    final = run_dir / "export"
    prov = json.loads((final / "branchmerge.json").read_text())
    ckpt = checkpoint_path(run_dir / "checkpoints", step)
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{ckpt} is missing: train with trainer.checkpoint_every_n_steps dividing {step}"
        )
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    config = AutoConfig.from_pretrained(final)
    with IN_PROCESS_MODELS, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights, strict=True, assign=True)
    plan = export_plan(model, prov["config"]["model"]["dtype"])
    sd = model.state_dict()
    tokenizer = AutoTokenizer.from_pretrained(final)
    prov = {**prov, "steps": step, "snapshot": {"checkpoint": str(ckpt), "run_steps": prov["steps"]}}
    export_hf(
        ((n, sd[n]) for n, _, _ in plan),
        plan,
        model.config,
        tokenizer,
        prov["config"]["data"]["template"],
        out_dir,
        prov,
    )
    return out_dir


# ---- merge ---------------------------------------------------------------------------------------
def merge_args(method: str, base: Path, experts: dict[str, Path], out: Path, toy_dir: Path) -> list[str]:
    """`merge.py` for one of the study's merges, the same knobs in every cell:
    tinyr1 = Arcee Fusion k 1.5, (math ⊕ science over science) ⊕ code over code, in fp32 arithmetic
             (the study's first cells were merged so; the bf16 recipe changes no score measurably);
    linear = the 3-way average; ties = 3-way TIES over the base, density 0.5, λ 1."""
    recipe = {
        "tinyr1": ["+experiment=toy_merge_tinyr1_fp32"],
        "linear": ["+experiment=toy_merge_soup", "steps.0.inputs=[math,code,science]"],
        "ties": ["+experiment=toy_merge_ties", "steps.0.inputs=[math,code,science]"],
    }[method]
    return [
        "merge.py",
        *recipe,
        f"models.base={base}",
        *(f"models.{d}={p}" for d, p in experts.items()),
        f"paths.toy_dir={toy_dir}",
        f"hydra.run.dir={out}",
        f"run_name={out.name}",
        f"output_dir={out / 'model'}",
        "options.progress=false",
    ]


# ---- evaluate ------------------------------------------------------------------------------------
def suite_tasks(suite: str, domains: list[str], limit: int | None) -> str:
    """An `eval.tasks=[...]` override: the suite's own task entries (every key it sets, e.g. its
    split) for `domains` only, each limited to its first `limit` items."""
    path = ROOT / "conf" / "eval" / f"{suite}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass --suite <a file in conf/eval/> (e.g. toy)")
    tasks = {t["name"]: t for t in yaml.safe_load(path.read_text())["tasks"]}
    missing = [f"toy_{d}" for d in domains if f"toy_{d}" not in tasks]
    if missing:
        raise ValueError(f"{path}: no task {missing}; the study needs toy_math, toy_code, toy_science")
    chosen = [
        {**tasks[f"toy_{d}"], "limit": limit if limit else tasks[f"toy_{d}"].get("limit")} for d in domains
    ]
    body = ",".join("{" + ",".join(f"{k}:{_val(v)}" for k, v in t.items()) + "}" for t in chosen)
    return f"eval.tasks=[{body}]"


def _val(v) -> str:
    return "null" if v is None else str(v)


def eval_args(model: Path, out: Path, suite: str, tasks: str, toy_dir: Path) -> list[str]:
    return [
        "evaluate.py",
        f"model_path={model}",
        f"eval={suite}",
        tasks,
        f"paths.toy_dir={toy_dir}",
        f"hydra.run.dir={out}",
        "threads=1",
        "sandbox.workers=1",
    ]
