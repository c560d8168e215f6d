"""A real Optuna sweep (2 trials, 8 val items per domain) through `python merge.py`, run under an audit
hook that logs every dataset file the process opens: while trials select, no test file is read for
scoring; then the winner alone is scored on test, and winner.json / results.jsonl carry both scores.

Toy merges of seeded fake branches (test_sweeps.fake_branches), as the other sweep tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge.data.records import read_records
from branchmerge.foundation import file_hash
from tests.conftest import ROOT
from tests.integration.test_sweeps import fake_branches  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
DOMAINS = ("math", "code", "science")
FINAL = "score_winner"  # the end-of-sweep step: everything it opens comes after selection
CHECK = "check_val_disjoint"  # reads test prompts only to prove val shares none


def audited_sweep(outputs: Path, toy_world: Path, log: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tests.file_audit",
        str(log),
        str(toy_world / "data"),
        "merge.py",
        "+experiment=toy_merge_arcee",
        "+hparams_search=toy_arcee_optuna",
        "hydra.sweeper.n_trials=2",
        f"paths.output_dir={outputs}",
        f"paths.toy_dir={toy_world}",
        "eval=toy_val_tiny",
        "score.test_eval=toy_tiny",
        "options.progress=false",
        "score.wandb.enabled=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_sweep_selects_without_reading_test_then_scores_its_winner_on_test(
    fake_branches,  # noqa: F811
    toy_world,
    tmp_path,
):
    """Bug guarded: a sweep suite that reads test items (the former toy_quick: trials ranked on the
    first 64 TEST items, so the winner is tuned on test). Planted by setting toy_val_tiny's tasks to
    split: test, this test fails: the trials' dataset files are test.jsonl and the audit log shows
    test.jsonl opened for documents during selection."""
    log = tmp_path / "opens.jsonl"
    audited_sweep(fake_branches, toy_world, log)
    opens = [json.loads(line) for line in log.read_text().splitlines()]
    data = toy_world / "data"
    selection = [o for o in opens if FINAL not in o["chain"]]
    final = [o for o in opens if FINAL in o["chain"]]

    # selection: each domain's val set is read for documents; test.jsonl only by the disjointness check
    for d in DOMAINS:
        val, test = str(data / d / "val.jsonl"), str(data / d / "test.jsonl")
        bad = [o["chain"] for o in selection if o["path"] == test and CHECK not in o["chain"]]
        assert not bad, f"test items of {d} read during selection by {bad[0]}"
        assert any(o["path"] == val and "load_toy" in o["chain"] for o in selection), d
    assert all(o["path"].endswith(("/val.jsonl", "/test.jsonl")) for o in opens)

    sweep = fake_branches / "sweeps" / "toy_arcee_optuna"
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    val_ids = {r.id for d in DOMAINS for r in read_records(data / d / "val.jsonl")}
    for r in rows:  # what each trial recorded and scored: val files, val items, 8 per domain
        res = json.loads((Path(r["run_dir"]) / "eval" / "results.json").read_text())
        for task, t in res["tasks"].items():
            path = data / task.removeprefix("toy_") / "val.jsonl"
            assert (t["dataset_file"], t["dataset_hash"]) == (str(path), file_hash(path)), task
        samples = (Path(r["run_dir"]) / "eval" / "samples.jsonl").read_text().splitlines()
        asked = [json.loads(x)["question"] for x in samples]
        assert len(asked) == 24 and set(asked) <= val_ids

    # after selection: the winner (best val objective) alone is scored on the test files
    winner = json.loads((sweep / "winner.json").read_text())
    best = max(rows, key=lambda r: r["objective"])
    assert winner["trial"] == best["trial"] and winner["val"]["objective"] == pytest.approx(best["objective"])
    assert winner["val"]["scores"] == best["scores"] and set(winner["val"]["splits"].values()) == {"val"}
    test_res = json.loads(Path(winner["test"]["results"]).read_text())
    assert Path(winner["test"]["results"]).parent.parent == Path(best["run_dir"])
    assert winner["test"]["scores"] == {
        k: {"pass@1": v["pass@1"], "stderr": v["stderr"]} for k, v in test_res["tasks"].items()
    }
    assert winner["test"]["objective"] == pytest.approx(
        sum(v["pass@1"] for v in test_res["tasks"].values()) / 3
    )
    for d in DOMAINS:
        test = str(data / d / "test.jsonl")
        assert winner["test"]["dataset_files"][f"toy_{d}"] == test
        assert any(o["path"] == test and "load_toy" in o["chain"] and CHECK not in o["chain"] for o in final)
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows if r.get("test")] == [best["trial"]]
    assert next(r for r in rows if r.get("test"))["test"]["scores"] == winner["test"]["scores"]
