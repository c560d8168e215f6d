"""Several sweep workers on one Optuna study, through the real entry point, one of them SIGKILLed in
the middle of a trial: on a real PostgreSQL server (started here on loopback, three workers) and on a
journal file (two workers, three objectives). Every requested trial completes exactly once, the
killed one is retried by a survivor, and a later command resumes the study.

Toy merges of seeded fake branches (test_sweeps.fake_branches), selected on eval=toy_val_tiny; the
workers that end together take turns scoring the winner on toy_tiny.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.test_sweeps import fake_branches  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
optuna = pytest.importorskip("optuna")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port> (trust auth, socket dir in tmp),
    run as `nobody` when we are root (initdb refuses root); stopped and deleted at the end."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries not found: run `make setup` (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="bm-pg-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, user="nobody")
    port = _free_port()
    run = lambda *a: subprocess.run([*as_user, *a], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(pg / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "bm", "--no-sync")
        opts = f"-p {port} -h 127.0.0.1 -k {root} -F"
        run(str(pg / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o", opts, "start")
        yield f"postgresql://bm@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(pg / "pg_ctl"), "-D", str(root / "data"), "-w", "-m", "immediate", "stop"]
        )
        shutil.rmtree(root, ignore_errors=True)


def worker(outputs: Path, toy_world: Path, storage: str, n_trials: int, *extra: str) -> subprocess.Popen:
    """One sweep worker: the sweep command every worker runs, with second-scale heartbeats."""
    cmd = [
        sys.executable,
        "merge.py",
        "+experiment=toy_merge_arcee",
        "+hparams_search=toy_arcee_optuna",
        f"hydra.sweeper.storage='{storage}'",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=3",
        "hydra.sweeper.poll_interval=1",
        f"paths.output_dir={outputs}",
        f"paths.toy_dir={toy_world}",
        "eval=toy_val_tiny",
        "score.test_eval=toy_tiny",
        "options.progress=false",
        "score.wandb.enabled=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    log = open(outputs / f"worker-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def kill_mid_trial(victim: subprocess.Popen, storage_url: str, timeout: float = 90) -> int:
    """SIGKILL `victim` 2 s after it claimed a trial (the merge is under way); returns the trial."""
    from branchmerge.sweep.storage import open_storage

    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(
                study_name="toy_arcee_optuna", storage=open_storage(storage_url, 1, 3, 2)
            )
        except KeyError:  # not created yet
            continue
        mine = [
            t
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
        ]
        if mine:
            time.sleep(2)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            return mine[0].number
    raise AssertionError("the worker to kill never claimed a trial")


def check_study(storage_url: str, n_trials: int, killed: int, victim_pid: int) -> list:
    """Every first attempt complete exactly once (the killed one through its retry)."""
    from branchmerge.sweep.storage import open_storage

    study = optuna.load_study(study_name="toy_arcee_optuna", storage=open_storage(storage_url, 1, 3, 2))
    trials = study.get_trials()
    first = [t for t in trials if "failed_trial" not in t.system_attrs]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(first) == n_trials
    assert [t.number for t in first if t.state.name != "COMPLETE"] == [killed]
    assert trials[killed].state.name == "FAIL"
    assert len(retries) == 1 and retries[0].system_attrs["failed_trial"] == killed
    assert retries[0].state.name == "COMPLETE" and retries[0].params == trials[killed].params
    assert not retries[0].user_attrs["worker"].endswith(f":{victim_pid}")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials
    keys = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(keys)) == n_trials  # no trial ran twice
    return complete


def rows_ok(sweep: Path) -> list[dict]:
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    return [r for r in rows if r["status"] == "ok"]


def run_killed_sweep(outputs, toy_world, storage, n_workers, n_trials, *extra):
    procs = [worker(outputs, toy_world, storage, n_trials, *extra) for _ in range(n_workers)]
    victim = procs[0]
    killed = kill_mid_trial(victim, storage)
    for p in procs[1:]:
        assert p.wait(timeout=240) == 0, _logs(outputs)
    return victim, killed


def _logs(outputs: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(outputs.glob("worker-*.log")))


def test_postgres_three_workers_one_killed(fake_branches, toy_world, postgres_url):  # noqa: F811
    """Bugs guarded: a dead worker's trial left RUNNING for ever (no heartbeat / no retry), a trial
    claimed by two workers (no claim lock), the budget counted per worker (more than n_trials)."""
    out = fake_branches.parent / "pg"
    shutil.copytree(fake_branches / "train", out / "train")
    victim, killed = run_killed_sweep(out, toy_world, postgres_url, 3, 4)
    complete = check_study(postgres_url, 4, killed, victim.pid)
    rows = rows_ok(out / "sweeps" / "toy_arcee_optuna")
    assert len(rows) == 4 and len({r["run_dir"] for r in rows}) == 4
    by_dir = {t.user_attrs["run_dir"]: t.value for t in complete}
    assert {r["run_dir"]: r["objective"] for r in rows} == pytest.approx(by_dir)
    # a fourth command resumes the same study: one more trial, numbered after the others
    assert worker(out, toy_world, postgres_url, 5).wait(timeout=240) == 0, _logs(out)
    study = optuna.load_study(
        study_name="toy_arcee_optuna", storage=postgres_url.replace("://", "+psycopg://")
    )
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 5 and done[-1].number == len(study.trials) - 1


def test_journal_two_workers_multi_objective(fake_branches, toy_world):  # noqa: F811
    """Journal storage (heartbeats as trial attributes), three objectives; the Pareto front the sweep
    reports (Optuna's) equals a brute-force front over its trials. Bug guarded as above, plus a
    front computed from the scalar objective instead of the three domains."""
    from branchmerge.report.sweep_plots import pareto_front, plot_sweep

    out = fake_branches.parent / "journal"
    shutil.copytree(fake_branches / "train", out / "train")
    storage = f"journal://{out}/sweeps/study.journal"
    multi = [
        "score.objectives=[toy_math,toy_code,toy_science]",
        "hydra.sweeper.direction=[maximize,maximize,maximize]",
    ]
    victim, killed = run_killed_sweep(out, toy_world, storage, 2, 4, *multi)
    check_study(storage, 4, killed, victim.pid)
    assert worker(out, toy_world, storage, 6, *multi).wait(timeout=240) == 0, _logs(out)
    sweep = out / "sweeps" / "toy_arcee_optuna"
    summary = json.loads((sweep / "optuna_summary.json").read_text())
    assert summary["states"] == {"COMPLETE": 6, "FAIL": 1} and summary["retried"] == [killed]
    rows = rows_ok(sweep)
    assert len(rows) == 6
    tasks = ["toy_math", "toy_code", "toy_science"]
    points = [tuple(r["objectives"][t] for t in tasks) for r in rows]
    for r in rows:
        assert [r["objectives"][t] for t in tasks] == [r["scores"][t]["pass@1"] for t in tasks]
    brute = {rows[i]["run_dir"] for i in pareto_front(points)}
    assert {t["run_dir"] for t in summary["pareto_front"]} == brute
    assert {p.name for p in plot_sweep(sweep)} >= {"pareto.png"}


def test_n_jobs_local_workers_feed_one_study(fake_branches, toy_world):  # noqa: F811
    """`hydra.sweeper.n_jobs=2`: two pinned copies of the command share the SQLite study. Bug
    guarded: n_jobs ignored (one process runs every trial) or each copy running n_trials."""
    from tests.integration.test_sweeps import merge_cmd

    out = fake_branches.parent / "local"
    shutil.copytree(fake_branches / "train", out / "train")
    proc = merge_cmd(
        out,
        toy_world,
        "+experiment=toy_merge_arcee",
        "+hparams_search=toy_arcee_optuna",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.poll_interval=1",
        "score.wandb.enabled=false",
    )
    sweep = out / "sweeps" / "toy_arcee_optuna"
    study = optuna.load_study(study_name="toy_arcee_optuna", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # not 3 per copy
    log = proc.stdout + proc.stderr
    assert "worker 0: cores" in log and "worker 1: cores" in log  # two pinned copies started
    # which copy claims which trial is a race (on a loaded machine one may claim all three): at most two
    assert 1 <= len({t.user_attrs["worker"] for t in study.trials}) <= 2
    assert len(rows_ok(sweep)) == 3
