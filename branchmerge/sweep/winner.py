"""After a sweep: the winner, chosen on the val split, scored once on the test split; both recorded.

    python merge.py +experiment=toy_merge_ties +hparams_search=toy_ties_grid      # does this at its end
    python -m branchmerge.sweep.winner outputs/sweeps/wandb_toy_ties_grid --suite toy   # after a W&B sweep

Trials score on the sweep's suite (`eval`; toy_val_quick reads val items only) and the best by
`score.metric` wins. The best of many noisy scores overestimates its own model (the winner's curse),
so the winner's weights are evaluated once more on `score.test_eval` (default `toy`: the full test
sets, which no trial read), with the settings of its own val evaluation (backend, dtype, batch size,
seed). A multi-objective sweep's winner is likewise the best by `score.metric`. Writes

    <sweep dir>/winner.json   {"trial", "params", "metric", "direction",
                               "val":  {suite, splits, scores, objective, dataset_files, results},
                               "test": {suite, splits, scores, objective, dataset_files, results}}

and puts the test scores on the winner's row of results.jsonl / results.csv. A Hydra callback
(`hydra.callbacks.score_winner`, set in conf/hparams_search/_sweep_dirs.yaml) runs it when the sweep
ends; it also refuses a test suite with a val task, before any trial runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import EvalSuiteConfig
from branchmerge.errors import ConfigError, MissingFileError
from branchmerge.foundation import write_json
from branchmerge.sweep.results import _locked, load_results, pick_winner, record_test
from branchmerge.sweep.trial import evaluate_once, objective_of, task_scores

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_suite(name: str, conf_dir: Path = CONF_DIR, key: str = "score.test_eval") -> dict:
    """conf/eval/<name>.yaml, validated, as a dict (defaults filled in: every task has its split)."""
    path = Path(conf_dir) / "eval" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise MissingFileError(f"{key}={name}: no suite {path}; choose one of {known}")
    return OmegaConf.to_container(validate(OmegaConf.load(path), EvalSuiteConfig))


def require_split(suite: dict, split: str, key: str) -> None:
    """Every task of `suite` reads `split`, else a ConfigError naming the first task that does not."""
    for task in suite["tasks"]:
        if task["split"] != split:
            raise ConfigError(
                f"{key}={suite['name']}: task {task['name']} reads its {task['split']} split, "
                f"this setting needs {split}; choose a suite of {split} tasks (e.g. "
                f"{'toy' if split == 'test' else 'toy_val_quick'})"
            )


def _side(results: dict, metric: str) -> dict:
    """One evaluation as winner.json records it."""
    scores = task_scores(results)
    return {
        "suite": results["suite"],
        "splits": {t["name"]: t.get("split", "test") for t in results["config"]["eval"]["tasks"]},
        "scores": scores,
        "objective": objective_of(scores, metric) if metric == "mean" or metric in scores else None,
        "dataset_files": {k: v["dataset_file"] for k, v in results["tasks"].items()},
        "dataset_hashes": {k: v["dataset_hash"] for k, v in results["tasks"].items()},
        "results": str(Path(results["config"]["paths"]["run_dir"]) / "results.json"),
    }


def score_winner(results_file: Path, suite: dict, metric: str = "mean", direction: str = "maximize") -> dict:
    """Score the sweep's winner (results.jsonl) on `suite`; write <sweep dir>/winner.json; return it.
    Workers that end together take turns (a lock): the second finds the first's result and reuses it."""
    results_file = Path(results_file)
    path = results_file.parent / "winner.json"
    with _locked(path):
        best = pick_winner(load_results(results_file), direction)
        if best is None:
            raise ValueError(f"{results_file} has no successful trial to score on {suite['name']}")
        val = json.loads((Path(best["run_dir"]) / "eval" / "results.json").read_text())
        out: dict[str, Any] = {
            "trial": best["trial"],
            "params": best["params"],
            "metric": metric,
            "direction": direction,
            "model_dir": best["model_dir"],
            "val": _side(val, metric),
            "test": _test_side(best, val["config"], suite, metric),
        }
        if "scores" in out["test"]:
            record_test(
                results_file, best["run_dir"], {k: out["test"][k] for k in ("suite", "scores", "objective")}
            )
        write_json(path, out)
    log.info(
        "winner %s: %s %s on val, %s on test (%s)",
        best["trial"],
        metric,
        out["val"]["objective"],
        out["test"].get("objective"),
        path,
    )
    return out


def _test_side(best: dict, val_config: dict, suite: dict, metric: str) -> dict:
    """The winner's weights on `suite`, run as its val evaluation ran (its own EvalConfig, re-aimed)."""
    if not any(Path(best["model_dir"]).glob("*.safetensors")):
        log.warning("not scoring %s on %s: its weights were deleted", best["trial"], suite["name"])
        return {"suite": suite["name"], "skipped": "the winner's weights were deleted (score.keep_weights)"}
    run_dir = str(Path(best["run_dir"]) / f"test_eval_{suite['name']}")
    cfg = {
        **val_config,
        "eval": suite,
        "run_name": f"{best['trial']}_{suite['name']}",
        "paths": {**val_config["paths"], "run_dir": run_dir},
    }
    return _side(evaluate_once(cfg), metric)


def _results_file(config: DictConfig) -> Path:
    s = config.score
    return Path(s.results_file) if s.results_file else Path(config.hydra.sweep.dir) / "results.jsonl"


class ScoreWinnerOnTest(Callback):
    """Hydra callback: check `score.test_eval` when the sweep starts, score the winner when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("eval") is None:
            return
        selection = OmegaConf.to_container(validate(config.eval, EvalSuiteConfig))
        if any(t["split"] == "test" for t in selection["tasks"]):
            log.warning(
                "this sweep selects on test items (eval=%s): the winner's score is optimistic; "
                "select on a val suite (eval=toy_val_quick) and leave test to score.test_eval",
                selection["name"],
            )
        if config.score.get("test_eval"):
            require_split(self._suite(config), "test", "score.test_eval")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("eval") is None or not config.score.get("test_eval"):
            return
        if os.environ.get("BM_SWEEP_WORKER"):  # a local worker: the process that spawned it does this
            return
        results_file = _results_file(config)
        if not load_results(results_file):
            log.warning("no trial rows in %s: nothing to score on %s", results_file, config.score.test_eval)
            return
        score_winner(results_file, self._suite(config), config.score.metric, config.score.direction)

    @staticmethod
    def _suite(config: DictConfig) -> dict:
        return load_suite(config.score.test_eval, Path(config.paths.root_dir) / "conf")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m branchmerge.sweep.winner", description=__doc__.splitlines()[0]
    )
    ap.add_argument("sweep_dir", type=Path, help="a folder holding results.jsonl")
    ap.add_argument("--suite", default="toy", help="a test suite under conf/eval/ (default: toy)")
    ap.add_argument("--metric", default="mean", help="what the sweep ranked by: mean or one task's name")
    ap.add_argument("--minimize", action="store_true", help="lower objective is better")
    args = ap.parse_args(argv)
    suite = load_suite(args.suite, key="--suite")
    require_split(suite, "test", "--suite")
    direction = "minimize" if args.minimize else "maximize"
    return score_winner(args.sweep_dir / "results.jsonl", suite, args.metric, direction)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
