"""The toy regime study end to end on a tiny grid: the runner (real train/merge/evaluate processes),
its snapshots, its reuse of finished work, and the analysis with its selection criterion."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from experiments.toy_regime import analyze, jobs
from experiments.toy_regime import run as runner
from tests.conftest import TOY_BASE

SMALL = ["trainer.global_batch_size=2", "trainer.micro_batch_size=2", "data.max_length=256"]


def tiny_argv(out: Path, toy_world: Path) -> list[str]:
    """1 lr, steps 3 and 6 (one run, a snapshot at 3), 1 seed, the linear merge, 2 items per domain.
    Warmup 1 step, so the snapshot lies 2 steps past it (where a total-dependent decay shows)."""
    argv = ["--out", str(out), "--base", f"weak={TOY_BASE}", "--lrs", "1e-3", "--steps", "3,6"]
    argv += ["--seeds", "1", "--warmup-steps", "1", "--methods", "linear", "--mixture", "none"]
    argv += ["--suite", "toy_tiny", "--limit", "2", "--toy-dir", str(toy_world), "--no-wait"]
    return argv + [f"--train-override={o}" for o in SMALL]


def verifier_evaluate(self, job, folder: Path, logf: Path) -> None:
    """evaluate.py's two output files (the fields the analysis reads), scored in this process by the
    toy verifier: the same greedy generations and grading without a process start per model. It runs
    in the runner's worker threads, so it holds the runner's lock for in-process model work."""
    from branchmerge.toy.score import score_checkpoint

    tasks, rows = {}, []
    for d in job.spec["domains"]:
        test_file = self.eval_toy_dir / "data" / d / "test.jsonl"
        with jobs.IN_PROCESS_MODELS:
            res = score_checkpoint(job.spec["model"], test_file, self.a.limit, max_new_tokens=320)
        tasks[f"toy_{d}"] = {"pass@1": res["accuracy"], "questions": res["n"]}
        rows += [
            {"task": f"toy_{d}", "doc_id": i, "sample": 0, "verdict": int(v)}
            for i, v in enumerate(res["verdicts"])
        ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "results.json").write_text(json.dumps({"model": {"path": job.spec["model"]}, "tasks": tasks}))


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_world) -> Path:
    """The tiny grid through the runner: real train.py and merge.py processes, verifier scoring.
    Every model the runner's own process builds (snapshot exports, the verifier's scorings, both in
    worker threads) must be built under jobs.IN_PROCESS_MODELS. Bug planted: the verifier scoring
    without the lock -> torch's default dtype set with the lock free; unguarded, a bf16 linear merge
    and an fp32 expert scored at once failed with 'float != BFloat16' now and then."""
    out = tmp_path_factory.mktemp("regime")
    unguarded, set_default_dtype = [], torch.set_default_dtype

    def guarded(dtype: torch.dtype) -> None:
        if not jobs.IN_PROCESS_MODELS.locked():
            unguarded.append(dtype)
        set_default_dtype(dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.Study, "evaluate", verifier_evaluate)
        mp.setattr(torch, "set_default_dtype", guarded)
        assert runner.main(tiny_argv(out, toy_world)) == 0, (out / "study.log").read_text()
    assert not unguarded and torch.get_default_dtype() == torch.float32
    return out


def check_outputs(study: Path) -> None:
    cell = "weak/lr1e-03_s0"
    for d in ("math", "code", "science"):
        assert (study / "train" / cell / d / "export" / "model.safetensors").exists()
        assert (study / "models" / cell / d / "step3" / "model.safetensors").exists()  # the snapshot
        for s in (3, 6):
            res = json.loads(
                (study / "evals" / cell / f"step{s}" / f"{d}_expert" / "results.json").read_text()
            )
            assert list(res["tasks"]) == [f"toy_{d}"] and res["tasks"][f"toy_{d}"]["questions"] == 2
    for s in (3, 6):
        res = json.loads((study / "evals" / cell / f"step{s}" / "linear" / "results.json").read_text())
        assert sorted(res["tasks"]) == ["toy_code", "toy_math", "toy_science"]
    info = analyze.analyze(study)
    rows = list(csv.DictReader((study / "results" / "cells.csv").open()))
    assert len(rows) == 2 * 3 and info["rows"] == 6  # 2 step counts x 3 domains, the linear merge
    assert {(r["steps"], r["domain"]) for r in rows} == {
        (s, d) for s in ("3", "6") for d in ("math", "code", "science")
    }
    for r in rows:  # the score columns agree with the verdict files
        gain = float(r["expert_score"]) - float(r["base_score"])
        assert float(r["expert_gain"]) == pytest.approx(gain, abs=0.02)
        if gain > 0:
            assert float(r["retention"]) == pytest.approx(
                (float(r["score"]) - float(r["base_score"])) / gain, abs=1e-3
            )
    assert "Criterion pick for `weak`" in (study / "results" / "summary.md").read_text()
    assert (study / "results" / "regime_map.png").stat().st_size > 10_000


def test_runner_writes_every_cell_and_the_analysis(study):
    check_outputs(study)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_runner_with_evaluate_py(study, tmp_path, toy_world):
    """The same grid with every score from `python evaluate.py` (9 processes): the trainings and merges
    are the `study` fixture's, copied with their done.json markers, so the runner runs only the
    scorings."""
    for part in ("train", "models", "merges"):
        shutil.copytree(study / part, tmp_path / part)
    shutil.copy(study / "study.json", tmp_path / "study.json")
    assert runner.main(tiny_argv(tmp_path, toy_world)) == 0, (tmp_path / "study.log").read_text()
    started = re.findall(r"\] start (\S+)", (tmp_path / "study.log").read_text())
    assert len(started) == 9 and all(k.startswith("eval/") for k in started)
    check_outputs(tmp_path)


@pytest.mark.timeout(900)
def test_snapshot_equals_a_separate_shorter_run(study, toy_world, tmp_path):
    """The step-3 export of the 6-step run must equal a 3-step run's weights, tensor for tensor.
    Planted bug that fails it: an lr schedule that depends on the run's total steps (cosine decay, or
    the warmup given as a fixed ratio of the total)."""
    run_dir = tmp_path / "short"
    args = jobs.train_args(
        experiment="toy_math_branch", base=TOY_BASE, run_dir=run_dir, lr=1e-3, total_steps=3, every=3,
        warmup_steps=1, seed=0, toy_dir=toy_world, output_dir=tmp_path, extra=SMALL,
    )  # fmt: skip
    jobs.run_logged(args, tmp_path / "short.log")
    short = load_file(run_dir / "export" / "model.safetensors")
    snap = load_file(study / "models" / "weak" / "lr1e-03_s0" / "math" / "step3" / "model.safetensors")
    final = load_file(study / "train" / "weak" / "lr1e-03_s0" / "math" / "export" / "model.safetensors")
    assert sorted(snap) == sorted(short)
    assert all(torch.equal(snap[k], short[k]) for k in snap)
    assert any(not torch.equal(snap[k], final[k]) for k in snap)  # step 3 is not the step-6 model


@pytest.mark.timeout(300)
def test_rerun_reuses_finished_cells(study, toy_world):
    """Planted bug that fails it: a runner that does not look for done.json and trains again."""
    marks = {p: p.stat().st_mtime_ns for p in study.rglob(jobs.DONE)}
    assert len(marks) == 3 + 2 + 1 + 2 * 3 + 2  # trains, merges, base, expert and merge scorings
    assert runner.main(tiny_argv(study, toy_world)) == 0
    assert {p: p.stat().st_mtime_ns for p in study.rglob(jobs.DONE)} == marks
    assert (study / "study.log").read_text().rstrip().endswith("stopped: 0 jobs run, 0 failed")


def test_changed_settings_on_the_same_out_are_refused(study, toy_world):
    argv = tiny_argv(study, toy_world)
    argv[argv.index("--limit") + 1] = "3"
    with pytest.raises(SystemExit, match="limit"):
        runner.main(argv)


def test_warmup_ratio_gives_exactly_the_warmup_steps():
    """Planted bug that fails it: ratio = W / T (ceil(W / T * T) is W + 1 where the float rounds up)."""
    from branchmerge.train.schedule import lr_lambda

    for total in range(1, 400):
        for w in {w for w in (1, 2, 4, 7, total) if w <= total}:
            ratio = jobs.warmup_ratio(w, total)
            assert math.ceil(ratio * total) == w, (w, total)
            assert lr_lambda(w - 2, total, ratio, "constant_with_warmup") < 1.0 if w > 1 else True
            assert lr_lambda(w - 1, total, ratio, "constant_with_warmup") == 1.0


def _stats(cells: dict) -> dict:
    """{(lr, steps): (gains, linear retentions)} per domain -> analyze's seed-stat layout."""
    out = {}
    for (lr, st), (gains, rets) in cells.items():
        for d, g, r in zip(analyze.DOMAINS, gains, rets):
            out[("b", lr, st, "linear", d)] = {
                "gain": (g, 0.0, 1),
                "retention": (r, 0.0, 1),
                "score": (0, 0, 1),
            }
    return out


def test_criterion_takes_the_largest_update_that_passes_both_gates():
    """Planted bugs that fail it: gates on the mean over domains instead of every domain; a pick by
    retention instead of update size."""
    stats = _stats(
        {
            (1e-4, 20): ([6, 6, 6], [0.95, 0.9, 0.9]),  # passes, small update
            (1e-4, 80): ([8, 9, 7], [0.75, 0.8, 0.71]),  # passes: the pick (8e-3)
            (3e-4, 40): ([20, 4, 30], [0.9, 0.9, 0.9]),  # code gains < 5 (mean gain would pass)
            (1e-3, 20): ([10, 10, 10], [0.9, 0.3, 0.95]),  # code keeps 30% (mean retention 72%)
        }
    )
    assert analyze.criterion(stats, "b") == (1e-4, 80)
    assert analyze.nearest_pick(stats, "b") == (1e-4, 80)
    none = _stats({(1e-3, 20): ([10, 10, 10], [0.9, 0.3, 0.95]), (1e-4, 20): ([2, 9, 9], [0.9, 0.9, 0.9])})
    assert analyze.criterion(none, "b") is None
    assert analyze.nearest_pick(none, "b") == (1e-3, 20)  # all experts gain >= 5 there


def test_retention_interval_covers_the_point_estimate():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.3).astype(int)
    expert = np.maximum(base, (rng.random(300) < 0.3).astype(int))
    merge = np.where(rng.random(300) < 0.5, expert, base)
    point = (merge.mean() - base.mean()) / (expert.mean() - base.mean())
    lo, hi = analyze.retention_interval(base, expert, merge)
    assert lo < point < hi and lo > 0.2 and hi < 0.9


def test_budget_skips_unstarted_groups_but_finishes_started_ones(tmp_path, toy_world):
    """Planted bug that fails it: stopping at the first group that does not fit (a started group
    further down the order would then never finish)."""
    argv = tiny_argv(tmp_path, toy_world) + ["--budget", "0.01"]
    argv[argv.index("--lrs") + 1] = "1e-3,1e-4"
    study = runner.Study(runner.parse_args(argv))
    jobs.mark_done(study.lay.train_dir(runner.Group("weak", 1e-4, 0), "math"), kind="train", seconds=1.0)
    keys = [j.key for j in study.admitted()]
    assert keys[0] == "eval/weak/base"
    assert not [k for k in keys if "lr1e-03" in k]  # not started, does not fit 0.6 s of budget
    started = [k for k in keys if "lr1e-04" in k]
    assert "train/weak/lr1e-04_s0/code" in started and "train/weak/lr1e-04_s0/math" not in started
    assert len(started) == 13 - 1  # 3 trains + 2 merges + 6 expert + 2 merge scorings, one done


def test_analysis_pools_studies_of_one_base_at_other_lrs(study, tmp_path):
    """Guards against `analyze.py --out A --out B` dropping B's cells, or counting the base twice:
    the study's cells moved to a second folder under another lr (its base evaluated in both) give
    twice the rows, one setting per lr, each with the same scores as the original."""
    other = tmp_path / "other_lr"
    (other / "evals" / "weak").mkdir(parents=True)
    shutil.copytree(study / "evals" / "weak" / "base", other / "evals" / "weak" / "base")
    cell = next(p.name for p in (study / "evals" / "weak").iterdir() if p.name.startswith("lr"))
    moved = cell.replace("lr", "lr9", 1)  # lr 1e-3 -> lr 91e-3 in the folder name: a different lr
    shutil.copytree(study / "evals" / "weak" / cell, other / "evals" / "weak" / moved)
    info = analyze.analyze([study, other], tmp_path / "pooled")
    rows = list(csv.DictReader((tmp_path / "pooled" / "cells.csv").open()))
    assert info["rows"] == len(rows) == 2 * 2 * 3
    by_lr: dict[str, list] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append((r["steps"], r["domain"], r["score"], r["base_score"]))
    assert len(by_lr) == 2
    first, second = (sorted(v) for v in by_lr.values())
    assert first == second
    summary = (tmp_path / "pooled" / "summary.md").read_text()
    assert summary.count("## base `weak`") == 1
