"""One sweep trial: merge, score the merged model on an eval suite, record it, return the objective.

    python merge.py +experiment=toy_merge_arcee eval=toy                     # one scored merge
    python merge.py -m +experiment=toy_merge_ties +hparams_search=toy_ties_grid   # a sweep of them

Without an `eval` suite this is exactly `branchmerge.merge.run.run` (merge.py returns its record).
With one, the merged folder is evaluated through the same harness as `evaluate.py` (results in
<run dir>/eval/), the objective is the suite's mean pass@1 or one task's (`score.metric`) -- or, for a multi-objective
sweep, the list of the pass@1s of the tasks named in `score.objectives` (in that order) -- one row
goes to the sweep's results table, one W&B run (offline by default) records it, and the weights are
kept or deleted by `score.keep_weights`. Inside a sweep (Hydra multirun or a W&B agent) a failing
trial logs its error, writes a failed row and returns `score.failure_value`, so the sweep goes on;
a single run raises as usual.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import EvalRunnerConfig, MergeConfig

log = logging.getLogger(__name__)
# overrides that choose what runs rather than a coefficient: not trial parameters
NOT_PARAMS = {"experiment", "hparams_search", "eval", "paths", "hydra", "score", "options", "overwrite"}


def run_trial(cfg: DictConfig) -> float | list[float] | dict:
    from branchmerge.merge.run import run as merge_run

    if cfg.get("eval") is None:
        return merge_run(cfg)
    t0 = time.time()
    params = trial_params()
    in_sweep = _in_sweep()
    run_dir = Path(cfg.paths.run_dir)
    try:
        checked = validate(cfg, MergeConfig)
        record = merge_run(checked, validated=True)
        scores = score_model(Path(checked.output_dir), checked, run_dir / "eval")
        objective = objective_of(scores, checked.score.metric)
        values = [objective_of(scores, task) for task in checked.score.objectives]
        status, error = "ok", None
    except Exception as e:
        if not in_sweep:
            raise
        log.error("trial failed, returning score.failure_value:\n%s", traceback.format_exc())
        checked = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        record, scores, status, error = {}, {}, "failed", f"{type(e).__name__}: {e}"
        objective = float(checked.score.failure_value)
        values = [objective] * len(checked.score.objectives)
    row = {
        "trial": run_dir.name,
        "status": status,
        "error": error,
        "params": params,
        "scores": scores,
        "objective": objective,
        "metric": checked.score.metric,
        "objectives": dict(zip(checked.score.objectives, values)),
        "merge_seconds": record.get("seconds"),
        "trial_seconds": round(time.time() - t0, 1),
        "model_dir": str(checked.output_dir),
        "run_dir": str(run_dir),
    }
    results_file = _results_file(checked)
    if results_file is not None:
        from branchmerge.sweep.results import record_trial

        record_trial(results_file, row, checked.score.keep_weights, checked.score.direction)
    _log_wandb(checked, row, results_file)
    log.info("trial %s: objective %.4f (%s) %s", row["trial"], objective, checked.score.metric, params)
    return values if checked.score.objectives else objective


def score_model(model_dir: Path, cfg: Any, eval_dir: Path) -> dict[str, dict[str, float]]:
    """pass@1 and stderr per task of `cfg.eval` on the merged folder; reuses a result of the same weights."""
    s = cfg.score
    eval_cfg = {
        "task_name": "eval",
        "run_name": f"{cfg.run_name}_{cfg.eval.name}",
        "paths": {**OmegaConf.to_container(cfg.paths), "run_dir": str(eval_dir)},
        "eval": OmegaConf.to_container(cfg.eval),
        "model_path": str(model_dir),
        **{f.name: s[f.name] for f in fields(EvalRunnerConfig)},  # how to run the model
        "data_dir": f"{cfg.paths.data_dir}/eval",
        "toy_dir": cfg.paths.toy_dir,
    }
    return task_scores(evaluate_once(eval_cfg))


def evaluate_once(eval_cfg: dict) -> dict:
    """evaluate.py's results for `eval_cfg` (an EvalConfig as a dict), or the results.json already in
    its run dir when that scored the same suite on the same weights (model folder hash)."""
    from branchmerge.eval.harness import evaluate, model_hash

    done = Path(eval_cfg["paths"]["run_dir"]) / "results.json"
    if done.exists():
        old = json.loads(done.read_text())
        same_suite = old.get("config", {}).get("eval") == eval_cfg["eval"]
        if same_suite and old["model"]["hash"] == model_hash(Path(eval_cfg["model_path"])):
            log.info("%s already scored these weights; reusing", done)
            return old
    return evaluate(OmegaConf.create(eval_cfg))


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    return {k: {"pass@1": v["pass@1"], "stderr": v["stderr"]} for k, v in results["tasks"].items()}


def objective_of(scores: dict[str, dict[str, float]], metric: str) -> float:
    """The suite's mean pass@1 (`mean`) or one task's pass@1."""
    if metric == "mean":
        return sum(v["pass@1"] for v in scores.values()) / len(scores)
    if metric not in scores:
        raise ValueError(
            f"score.metric={metric!r} is not a task of the suite; use 'mean' or one of {sorted(scores)}"
        )
    return scores[metric]["pass@1"]


def trial_params() -> dict[str, Any]:
    """This job's command-line overrides that set values (coefficients), parsed as YAML scalars."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    out = {}
    for o in HydraConfig.get().overrides.task:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key.split(".")[0] in NOT_PARAMS or key.split("@")[0] in NOT_PARAMS:
            continue
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return multirun or bool(os.environ.get("WANDB_SWEEP_ID"))


def _results_file(cfg: Any) -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.score.results_file:
        return Path(cfg.score.results_file)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir) / "results.jsonl"
    return None


def _log_wandb(cfg: Any, row: dict, results_file: Path | None) -> None:
    w = cfg.score.wandb
    if not w.enabled or w.mode == "disabled":
        return
    from branchmerge.sweep.wandb_run import log_trial

    sweep = cfg.score.sweep_name or (results_file.parent.name if results_file else cfg.run_name)
    log_trial(
        project=w.project,
        group=w.group or sweep,
        mode=w.mode,
        name=f"{sweep}/{row['trial']}",
        config={"params": row["params"], "recipe": {"models": cfg.models, "steps": cfg.steps}},
        row=row,
        run_dir=Path(row["run_dir"]),
    )
