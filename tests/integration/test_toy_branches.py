"""The situation the method exists for, measured: each toy branch, trained from the shipped strong toy
base with its own experiment config on the harder toy world (which the branch's training builds first),
beats the base on its own domain's held-out set (greedy, toy verifier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TOY_BASE_STRONG
from tests.integration.test_evaluate import check_against_verifier, eval_cmd

DOMAINS = ("math", "code", "science")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EVAL_MATH = "eval.tasks=[{name: toy_math, n: 1, temperature: 0.0, top_p: 1.0, max_gen_toks: 320, limit: 96}]"


class Procs:
    """Processes started from the repo root on one thread each, stdout and stderr to files under `logs`,
    all due by `deadline`; those still running when the block ends (a failure) are killed."""

    def __init__(self, logs: Path, deadline: float) -> None:
        self.logs, self.deadline, self.running = logs, deadline, {}

    def start(self, name: str, cmd: list[str]) -> None:
        with (self.logs / f"{name}.out").open("w") as out, (self.logs / f"{name}.err").open("w") as err:
            self.running[name] = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err)

    def done(self, name: str, block: bool = True) -> str | None:
        """`name`'s stdout once it has exited 0 (without `block`: None while it runs); a failure raises
        with its stderr, and so does a process still running at the deadline."""
        proc = self.running[name]
        try:
            proc.wait(timeout=max(1.0, self.deadline - time.time()) if block else 0)
        except subprocess.TimeoutExpired:
            assert not block and time.time() < self.deadline, f"{name} still running at the deadline"
            return None
        err = (self.logs / f"{name}.err").read_text()
        assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed:\n{err[-3000:]}"
        return (self.logs / f"{name}.out").read_text()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def score_cmd(model: Path, domain: str, world: Path) -> list[str]:
    """`python -m branchmerge.toy.score` on one thread: greedy, the domain's whole test split, the toy
    verifier; prints {"n", "correct", "accuracy"}."""
    return [sys.executable, "-m", "branchmerge.toy.score", str(model), "--domain", domain] + [
        "--toy-dir",
        str(world),
        "--threads",
        "1",
    ]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~10 min on an idle 2-core machine: three trainings, seven scorings
def test_each_toy_branch_beats_the_base_on_its_own_domain(toy_outputs, tmp_path):
    """The trainings, the base's scorings and each branch's scorings (started as its training ends)
    run side by side, one thread each, so both cores stay busy until the last scoring. The three
    trainings start together on an output folder without the harder world: one builds it, the
    others wait for it (a world half-written by two builders fails their data loading)."""
    world = toy_outputs / "toy_world_hard"
    branches = {d: toy_outputs / "train" / f"toy_{d}_branch" / "export" for d in DOMAINS}
    with Procs(tmp_path, deadline=time.time() + 2200) as procs:
        for d in DOMAINS:
            procs.start(
                f"train_{d}",
                [sys.executable, "train.py", f"+experiment=toy_{d}_branch", "logger=csv"]
                + ["trainer.progress_bar=false", f"paths.output_dir={toy_outputs}"],
            )
        deadline = time.time() + 600
        while not (world / "manifest.json").exists():  # the base is scored on the world the branches build
            assert time.time() < deadline, "no toy world was built by the branches' training"
            time.sleep(1)
        for d in DOMAINS:
            procs.start(f"base_{d}", score_cmd(TOY_BASE_STRONG, d, world))
        trained: set[str] = set()
        while len(trained) < len(DOMAINS):
            time.sleep(1)
            for d in sorted(set(DOMAINS) - trained):
                if procs.done(f"train_{d}", block=False) is not None:
                    trained.add(d)
                    procs.start(f"branch_{d}", score_cmd(branches[d], d, world))
            if "math" in trained and "eval_math" not in procs.running:
                # the math branch through evaluate.py (lm-eval, HF backend) as well
                cmd = eval_cmd(
                    toy_outputs, branches["math"], EVAL_MATH, "threads=1", f"paths.toy_dir={world}"
                )
                procs.start("eval_math", cmd)
        report = {
            d: tuple(
                json.loads(procs.done(f"{kind}_{d}").splitlines()[-1])["accuracy"]
                for kind in ("base", "branch")
            )
            for d in DOMAINS
        }
        procs.done("eval_math")
    print(json.dumps(report))
    for d, (base, branch) in report.items():
        assert branch > base, f"{d}: branch {branch:.3f} does not beat the base {base:.3f}"
    # and evaluate.py's verdicts on the branch agree with the toy verifier
    res = check_against_verifier(toy_outputs / "eval" / "toy_math_branch_toy", world)
    assert res["tasks"]["toy_math"]["pass@1"] > 0
