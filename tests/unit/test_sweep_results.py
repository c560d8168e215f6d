"""The sweep results table: rows replace by trial folder, the CSV is flat, keep-weights policies, Pareto."""

from __future__ import annotations

import json

import pytest

from branchmerge.report.sweep_plots import pareto_front, swept_params
from branchmerge.sweep.results import copy_best, flatten, load_results, record_trial
from branchmerge.sweep.trial import objective_of


def _trial(tmp_path, name, objective, status="ok", k=1.0):
    run = tmp_path / name
    model = run / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"w")
    (model / "config.json").write_text("{}")
    (model / "merge_provenance.json").write_text("{}")
    scores = {
        "toy_math": {"pass@1": objective, "stderr": 0.01},
        "toy_code": {"pass@1": 1 - objective, "stderr": 0.02},
    }
    return {
        "trial": name,
        "status": status,
        "error": None if status == "ok" else "ValueError: boom",
        "params": {"steps.0.params.k": k},
        "scores": scores if status == "ok" else {},
        "objective": objective,
        "metric": "toy_math",
        "run_dir": str(run),
        "model_dir": str(model),
    }


def test_keep_best_keeps_exactly_the_best_trials_weights(tmp_path):
    path = tmp_path / "results.jsonl"
    for name, obj in [("a", 0.3), ("b", 0.5), ("c", 0.4), ("d", 0.6)]:
        record_trial(path, _trial(tmp_path, name, obj), "best", "maximize")
    rows = load_results(path)
    assert [r["trial"] for r in rows if r["weights_kept"]] == ["d"]
    for r in rows:
        model = tmp_path / r["trial"] / "model"
        assert (model / "model.safetensors").exists() == (r["trial"] == "d")
        assert (model / "config.json").exists()  # only the weights go
        # a folder without weights is no longer a finished merge that merge.py would reuse
        assert (model / "merge_provenance.json").exists() == (r["trial"] == "d")
    assert (tmp_path / "best").exists() is False
    copy_best(path, tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").exists()


def test_minimize_none_failures_and_rerun_of_a_trial(tmp_path):
    path = tmp_path / "results.jsonl"
    record_trial(path, _trial(tmp_path, "a", 0.3), "best", "minimize")
    record_trial(path, _trial(tmp_path, "b", 0.1), "best", "minimize")
    record_trial(path, _trial(tmp_path, "c", -1.0, status="failed"), "best", "minimize")
    rows = load_results(path)
    assert [(r["trial"], r["weights_kept"]) for r in rows] == [("a", False), ("b", True), ("c", False)]
    record_trial(path, _trial(tmp_path, "e", 0.2), "none", "maximize")
    assert not (tmp_path / "e" / "model" / "model.safetensors").exists()
    # the same trial folder scored again replaces its row instead of adding one
    (tmp_path / "a" / "model").rename(tmp_path / "a" / "old")
    record_trial(path, _trial(tmp_path, "a", 0.05), "all", "minimize")
    rows = load_results(path)
    assert len(rows) == 4 and rows[-1]["trial"] == "a" and rows[-1]["objective"] == 0.05
    flat = flatten(rows)
    assert flat[-1]["steps.0.params.k"] == 1.0 and flat[-1]["toy_code"] == pytest.approx(0.95)
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[0].split(",")[:3] == ["trial", "status", "steps.0.params.k"]
    failed = [json.loads(line) for line in path.read_text().splitlines() if '"failed"' in line]
    assert [(r["trial"], r["error"]) for r in failed] == [("c", "ValueError: boom")]


def test_objective_and_pareto_front():
    scores = {"toy_math": {"pass@1": 0.2, "stderr": 0.0}, "toy_code": {"pass@1": 0.4, "stderr": 0.0}}
    assert objective_of(scores, "mean") == pytest.approx(0.3)
    assert objective_of(scores, "toy_code") == 0.4
    with pytest.raises(ValueError, match="toy_science.*'mean' or one of"):
        objective_of(scores, "toy_science")
    pts = [(1, 5), (2, 4), (2, 3), (0, 0), (3, 1), (2, 4)]
    assert pareto_front(pts) == [0, 1, 4, 5]  # (2,3) and (0,0) are dominated; equal points both stay
    rows = [{"params": {"k": 1, "s": "x", "w": 0.5}}, {"params": {"k": 2, "s": "y", "w": 0.5}}]
    assert swept_params(rows) == ["k"]


def test_winner_and_its_test_scores_on_one_row(tmp_path):
    """The winner is the best successful trial (a failure's value never wins, even minimizing), and
    its test scores sit on its row only: a later winner takes them over (guards against two rows
    showing test scores after a resumed sweep crowned another trial). The flat table is rectangular:
    the other rows carry the winner's test columns as None (guards against a reader that takes the
    columns from one row and then fails on a row without them, as the analysis notebook did)."""
    from branchmerge.sweep.results import pick_winner, record_test

    path = tmp_path / "results.jsonl"
    for name, obj in [("a", 0.3), ("b", 0.5)]:
        record_trial(path, _trial(tmp_path, name, obj), "all", "maximize")
    record_trial(path, _trial(tmp_path, "c", -1.0, status="failed"), "all", "maximize")
    rows = load_results(path)
    assert pick_winner(rows)["trial"] == "b" and pick_winner(rows, "minimize")["trial"] == "a"
    assert pick_winner([r for r in rows if r["status"] == "failed"]) is None
    test = {"suite": "toy", "scores": {"toy_math": {"pass@1": 0.25, "stderr": 0.1}}, "objective": 0.25}
    record_test(path, rows[0]["run_dir"], test)
    record_test(path, rows[1]["run_dir"], {**test, "objective": 0.4})
    rows = load_results(path)
    assert [r.get("test", {}).get("objective") for r in rows] == [None, 0.4, None]
    flat = flatten(rows)
    assert flat[1]["test_objective"] == 0.4 and flat[1]["test_toy_math"] == 0.25
    assert flat[0]["test_objective"] is None and flat[2]["test_toy_math"] is None
    assert all(list(r) == list(flat[1]) for r in flat)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"test_objective", "test_toy_math"} <= set(header)


def _results_json(run_dir, suite: dict, model_dir, pass1: float) -> None:
    """A results.json as evaluate.py writes it (the keys winner.py reads), for `suite` on `model_dir`."""
    from branchmerge.eval.harness import model_hash

    tasks = {
        t["name"]: {
            "pass@1": pass1,
            "stderr": 0.1,
            "dataset_file": f"/w/{t['split']}.jsonl",
            "dataset_hash": "h",
        }
        for t in suite["tasks"]
    }
    config = {"eval": suite, "paths": {"run_dir": str(run_dir)}, "model_path": str(model_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(
        json.dumps(
            {
                "suite": suite["name"],
                "model": {"hash": model_hash(model_dir)},
                "tasks": tasks,
                "config": config,
            }
        )
    )


def test_winner_cli_scores_the_val_winner_on_a_test_suite(tmp_path):
    """`python -m branchmerge.sweep.winner <sweep dir> --suite toy_tiny` (what a W&B sweep runs by
    hand): the winner is the best val trial, its test result (here already on disk for its weights,
    so reused) lands in winner.json beside its val scores; a val suite is refused as the test suite."""
    from branchmerge.errors import ConfigError
    from branchmerge.sweep.winner import load_suite, main

    val_suite, test_suite = load_suite("toy_val_tiny"), load_suite("toy_tiny")
    path = tmp_path / "results.jsonl"
    for name, obj in [("a", 0.3), ("b", 0.5)]:
        row = _trial(tmp_path, name, obj)
        row["metric"] = "mean"
        _results_json(tmp_path / name / "eval", val_suite, tmp_path / name / "model", obj)
        record_trial(path, row, "all", "maximize")
    _results_json(tmp_path / "b" / "test_eval_toy_tiny", test_suite, tmp_path / "b" / "model", 0.2)
    winner = main([str(tmp_path), "--suite", "toy_tiny"])
    assert winner == json.loads((tmp_path / "winner.json").read_text())
    assert winner["trial"] == "b" and winner["val"]["objective"] == pytest.approx(0.5)
    assert winner["test"]["objective"] == pytest.approx(0.2)
    assert set(winner["val"]["splits"].values()) == {"val"} and set(winner["test"]["splits"].values()) == {
        "test"
    }
    assert winner["test"]["dataset_files"]["toy_math"] == "/w/test.jsonl"
    assert [r["trial"] for r in load_results(path) if r.get("test")] == ["b"]
    with pytest.raises(ConfigError, match="--suite=toy_val_tiny: task toy_math reads its val split"):
        main([str(tmp_path), "--suite", "toy_val_tiny"])
