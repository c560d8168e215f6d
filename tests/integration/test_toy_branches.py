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

from tests.conftest import EARLY_JOBS, ROOT
from tests.integration.test_evaluate import check_against_verifier


def _job(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The background job `tests/conftest.py` started at collection; else (under xdist) a new one."""
    if "toy_branches" in EARLY_JOBS:
        return EARLY_JOBS["toy_branches"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "job.log").open("w") as log:
        cmd = [sys.executable, "-m", "tests.integration.toy_branches_job", str(tmp_path)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, tmp_path


@pytest.mark.slow
@pytest.mark.timeout(
    2400
)  # ~10 CPU-minutes: three trainings, seven scorings (tests/integration/toy_branches_job.py)
def test_each_toy_branch_beats_the_base_on_its_own_domain(tmp_path):
    """The three trainings start together on an output folder without the harder world: one builds
    it, the others wait for it (a world half-written by two builders fails their data loading); the
    base and each branch are scored on the first 500 test items of the domain, and the math branch
    through evaluate.py as well, whose verdicts must agree with the toy verifier."""
    proc, out = _job(tmp_path)
    deadline = time.time() + 2300
    while proc.poll() is None:
        assert time.time() < deadline, "the toy-branch job is still running at the deadline"
        time.sleep(2)
    failed = out / "failed.txt"
    assert not failed.exists(), failed.read_text()
    assert (out / "report.json").exists(), (out / "job.log").read_text()[-3000:]
    report = json.loads((out / "report.json").read_text())
    print(json.dumps(report["scores"]))
    for d, s in report["scores"].items():
        base, branch = s["base"], s["branch"]
        assert base["n"] == branch["n"] == 500, (d, base, branch)
        assert branch["accuracy"] > base["accuracy"], f"{d}: branch {branch} does not beat the base {base}"
    res = check_against_verifier(Path(report["eval_math"]), Path(report["world"]))
    assert res["tasks"]["toy_math"]["pass@1"] > 0
