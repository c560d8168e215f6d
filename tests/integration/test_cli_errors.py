"""A mistake a user makes reaches them, through each stage's real command, as one line naming the key or
file and the fix, with no traceback and a non-zero exit; HYDRA_FULL_ERROR=1 shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run_cli(script: str, tmp_path: Path, *overrides: str, full: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full:
        env["HYDRA_FULL_ERROR"] = "1"
    cmd = [sys.executable, script, f"paths.output_dir={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


CASES = {
    "train": (
        "train.py",
        ["+experiment=math_branch", "trainer.micro_batch_size=two"],  # caught before any model or data
        "error: ConfigError: TrainConfig config: trainer.micro_batch_size: expected int",
    ),
    "eval": (
        "evaluate.py",
        ["eval=paper", "model_path=/nonexistent/branch"],
        "error: MissingFileError: model_path=/nonexistent/branch is not a Hugging Face model folder",
    ),
    "merge": (
        "merge.py",
        ["method=linear", "inputs=[/nonexistent/a,/nonexistent/b]", "output_dir=/tmp/bm-never-written"],
        "error: CheckpointError: checkpoint folder /nonexistent/a does not exist",
    ),
    "distill": (
        "distill.py",
        ["teacher=toy"],
        "error: ConfigError: nothing to do: set `toy:`",
    ),
}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_user_error_is_one_line_without_traceback(stage, tmp_path):
    """Guards against: an error class outside the BranchmergeError family (a traceback reaches the user),
    an entry point that does not run inside `reported()`, or a zero exit status on failure."""
    script, overrides, expected = CASES[stage]
    proc = run_cli(script, tmp_path, *overrides)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_hydra_full_error_shows_the_traceback(tmp_path):
    script, overrides, _ = CASES["distill"]
    proc = run_cli(script, tmp_path, *overrides, full=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: nothing to do" in proc.stderr
