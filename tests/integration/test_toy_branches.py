"""The situation the method exists for, measured: each toy branch, trained from the shipped toy base
with its own experiment config, beats the base on its own domain's held-out set (greedy, toy verifier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TOY_BASE

DOMAINS = ("math", "code", "science")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~8 min on an idle 2-core machine: three trainings and six scorings
def test_each_toy_branch_beats_the_base_on_its_own_domain(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"paths.output_dir={tmp_path}"]
    subprocess.run(
        [sys.executable, "distill.py", "+experiment=toy_data", *common],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                f"+experiment=toy_{d}_branch",
                "logger=csv",
                "trainer.progress_bar=false",
                *common,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for d in DOMAINS
    ]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err.decode()[-3000:]
    from branchmerge.toy.score import score_checkpoint

    report = {}
    for d in DOMAINS:
        test_file = tmp_path / "toy_world" / "data" / d / "test.jsonl"
        base = score_checkpoint(TOY_BASE, test_file)["accuracy"]
        branch = score_checkpoint(tmp_path / "train" / f"toy_{d}_branch" / "export", test_file)["accuracy"]
        report[d] = (base, branch)
    print(json.dumps(report))
    for d, (base, branch) in report.items():
        assert branch > base, f"{d}: branch {branch:.3f} does not beat the base {base:.3f}"
    # and a branch scored through evaluate.py (lm-eval, HF backend) agrees with the toy verifier
    from tests.integration.test_evaluate import check_against_verifier, run_eval

    branch = tmp_path / "train" / "toy_math_branch" / "export"
    run_eval(
        tmp_path,
        branch,
        "eval.tasks=[{name: toy_math, n: 1, temperature: 0.0, top_p: 1.0, max_gen_toks: 320, limit: 96}]",
        f"toy_dir={tmp_path / 'toy_world'}",
    )
    res = check_against_verifier(tmp_path / "eval" / "toy_math_branch_toy", tmp_path / "toy_world")
    assert res["tasks"]["toy_math"]["pass@1"] > 0
