"""Sweeps over merge coefficients, through the real entry point (`python merge.py -m ...`), offline:
a Hydra grid, an Optuna study that continues after a stop, keep-only-the-best, a failing trial that
does not stop the sweep, every W&B sweep file's command run once, and the sweep plots.

The "branches" are the shipped toy base plus seeded Gaussian deltas (no training: seconds), trials
select on `eval=toy_val_tiny` (8 val items per domain) and a Hydra sweep's winner is scored on
`toy_tiny` (8 test items per domain), so each trial costs a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TOY_BASE

pytestmark = pytest.mark.slow
BRANCHES = {"math": 1, "code": 2, "science": 3}


@pytest.fixture(scope="module")
def fake_branches(tmp_path_factory) -> Path:
    """outputs/ with train/toy_<d>_branch/export = toy base + 5%-of-RMS Gaussian deltas (seeded)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("sweep") / "outputs"
    base = load_file(TOY_BASE / "model.safetensors")
    for domain, seed in BRANCHES.items():
        dest = out / "train" / f"toy_{domain}_branch" / "export"
        shutil.copytree(TOY_BASE, dest)
        g = torch.Generator().manual_seed(seed)
        tensors = {
            k: (v + 0.05 * v.float().pow(2).mean().sqrt() * torch.randn(v.shape, generator=g)).to(v.dtype)
            for k, v in base.items()
        }
        save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return out


def merge_cmd(outputs: Path, toy_world: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "merge.py",
        *args,
        f"paths.output_dir={outputs}",
        f"paths.toy_dir={toy_world}",
        "eval=toy_val_tiny",
        "++score.test_eval=toy_tiny",
        "options.progress=false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def rows_of(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]


def test_grid_sweep_keeps_only_the_best_weights(fake_branches, toy_world):
    merge_cmd(
        fake_branches,
        toy_world,
        "+experiment=toy_merge_ties",
        "+hparams_search=toy_ties_grid",
        "score.keep_weights=best",
    )
    sweep = fake_branches / "sweeps" / "toy_ties_grid"
    rows = rows_of(sweep)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    grid = {(r["params"]["steps.0.params.density"], r["params"]["steps.0.params.lambda_"]) for r in rows}
    assert grid == {(d, w) for d in (0.3, 0.5, 0.7) for w in (0.7, 1.0)}
    for r in rows:  # the objective is the mean of the three domains' pass@1
        assert set(r["scores"]) == {"toy_math", "toy_code", "toy_science"}
        assert r["objective"] == pytest.approx(sum(s["pass@1"] for s in r["scores"].values()) / 3)
        assert (Path(r["run_dir"]) / "eval" / "results.json").exists()
        runs = list((Path(r["run_dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, f"one offline W&B run per trial, got {runs}"
    kept = [r for r in rows if r["weights_kept"]]
    assert len(kept) == 1 and kept[0]["objective"] == max(r["objective"] for r in rows)
    winner = json.loads((sweep / "winner.json").read_text())  # the kept weights, scored on test
    assert winner["trial"] == kept[0]["trial"] and winner["test"]["suite"] == "toy_tiny"
    assert kept[0]["test"]["scores"] == winner["test"]["scores"]
    for r in rows:
        has_weights = any(Path(r["model_dir"]).glob("*.safetensors"))
        assert has_weights == r["weights_kept"]
    csv_lines = (sweep / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and "steps.0.params.density" in csv_lines[0] and "toy_math" in csv_lines[0]

    from branchmerge.report.sweep_plots import plot_sweep

    written = plot_sweep(sweep)
    assert {p.name for p in written} >= {"score_vs_steps.0.params.density.png", "pareto.png"}
    assert all(p.stat().st_size > 5000 for p in written)


def test_optuna_sweep_continues_its_study(fake_branches, toy_world):
    """n_trials is the study's total: a rerun with a larger total continues the same study (trial
    numbers go on, no trial repeated); the same command again finds it finished and runs nothing."""
    import optuna

    args = ["+experiment=toy_merge_arcee", "+hparams_search=toy_arcee_optuna"]
    merge_cmd(fake_branches, toy_world, *args, "hydra.sweeper.n_trials=3")
    merge_cmd(fake_branches, toy_world, *args, "hydra.sweeper.n_trials=6")  # extends the study
    merge_cmd(fake_branches, toy_world, *args, "hydra.sweeper.n_trials=6")  # finished: a no-op
    sweep = fake_branches / "sweeps" / "toy_arcee_optuna"
    study = optuna.load_study(study_name="toy_arcee_optuna", storage=f"sqlite:///{sweep / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 and [t.number for t in done] == list(range(6))
    rows = rows_of(sweep)
    assert len(rows) == 6 and len({r["trial"] for r in rows}) == 6
    ks = sorted(round(r["params"]["steps.0.params.k"], 9) for r in rows)
    assert ks == sorted(round(t.params["steps.0.params.k"], 9) for t in done)
    by_k = {round(r["params"]["steps.0.params.k"], 9): r["objective"] for r in rows}
    for t in done:  # the value Optuna recorded is the objective merge.py returned
        assert t.value == pytest.approx(by_k[round(t.params["steps.0.params.k"], 9)])


def test_failed_trial_reports_failure_value_and_sweep_goes_on(fake_branches, toy_world):
    out = fake_branches.parent / "failing"
    shutil.copytree(fake_branches / "train", out / "train")
    merge_cmd(
        out,
        toy_world,
        "-m",
        "+experiment=toy_merge_arcee",
        "steps.0.base=science,no_such_model",
        "score.results_file=" + str(out / "sweeps" / "fail" / "results.jsonl"),
        "hydra.sweep.dir=" + str(out / "sweeps" / "fail"),
        "hydra.sweep.subdir=${hydra.job.num}",
        "score.wandb.enabled=false",
    )
    rows = rows_of(out / "sweeps" / "fail")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["objective"] == -1.0 and "no_such_model" in rows[1]["error"]


def test_single_run_failure_raises(fake_branches, toy_world):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "merge.py",
            "+experiment=toy_merge_arcee",
            "steps.0.base=no_such_model",
            f"paths.output_dir={fake_branches}",
            "eval=toy_val_tiny",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "no_such_model" in proc.stderr


def _draw(spec: dict, rng: random.Random):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    return round(rng.uniform(spec["min"], spec["max"]), 4)


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "sweeps").glob("toy_*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_file_runs_once(sweep_file, fake_branches, toy_world):
    """Parse the W&B sweep file, draw one set of parameters, and run its command as an agent would
    (`${args_no_hyphens}` expanded, WANDB_RUN_ID and WANDB_SWEEP_ID set), offline."""
    spec = yaml.safe_load(sweep_file.read_text())
    assert spec["method"] in ("grid", "bayes", "random") and spec["metric"]["name"] == "objective"
    params = {k: _draw(v, random.Random(0)) for k, v in spec["parameters"].items()}
    args = [f"{k}={v}" for k, v in params.items()]
    cmd = []
    for c in spec["command"]:
        if c == "${env}":
            continue
        cmd += {
            "${interpreter}": [sys.executable],
            "${program}": [spec["program"]],
            "${args_no_hyphens}": args,
        }.get(c, [c])
    cmd = [c for c in cmd if not c.startswith("eval=")]
    cmd += [f"paths.output_dir={fake_branches}", f"paths.toy_dir={toy_world}", "eval=toy_val_tiny"]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_RUN_ID": f"test{sweep_file.stem[-8:]}",
        "WANDB_SWEEP_ID": "testsweep",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = next(fake_branches.glob(f"sweeps/{spec['name']}/results.jsonl"))
    row = json.loads(results.read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["params"] == {k: params[k] for k in params}
    assert list(Path(row["run_dir"]).glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_file_composes(sweep_file):
    """Every W&B sweep file (the 32B ones too, which cannot run here) parses, and its command with
    drawn parameters composes and validates as a merge config (`--cfg job` resolves nothing heavy)."""
    from omegaconf import OmegaConf

    from branchmerge.config import validate
    from branchmerge.config.schema import MergeConfig
    from tests.conftest import compose

    spec = yaml.safe_load(sweep_file.read_text())
    assert spec["program"] == "merge.py" and "${args_no_hyphens}" in spec["command"]
    params = {k: _draw(v, random.Random(1)) for k, v in spec["parameters"].items()}
    overrides = [
        c
        for c in spec["command"]
        if not c.startswith("${") and not c.startswith("hydra.") and c != spec["program"]
    ]
    cfg = compose("merge", [*overrides, *(f"{k}={v}" for k, v in params.items())])
    checked = validate(cfg, MergeConfig)
    assert checked.eval is not None and checked.score.sweep_name == spec["name"]
    for key, value in params.items():
        assert OmegaConf.select(checked, key) == value
