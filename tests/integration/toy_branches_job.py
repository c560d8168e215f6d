"""The work behind `test_each_toy_branch_beats_the_base_on_its_own_domain`, as one process:

    python -m tests.integration.toy_branches_job OUT_DIR

trains the three toy branches with their own experiment configs into OUT_DIR (the first training builds
the harder toy world there; the others wait for it), scores the strong base and each branch on the
first LIMIT test items of its domain with the toy verifier (`python -m branchmerge.toy.score`), scores
the math branch through `evaluate.py` as well, and writes OUT_DIR/report.json — last, so that its
presence means every step succeeded; a failed step writes OUT_DIR/failed.txt with its stderr.

`tests/conftest.py` starts it (niced) when the test session starts, so that its ~10 CPU-minutes run on
the core the mostly single-process suite leaves idle; the test then only waits for the report. Run
alone, or under pytest-xdist, the test starts it itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "branchmerge" / "toy" / "assets" / "toy_base_strong"
DOMAINS = ("math", "code", "science")
LIMIT = 500  # test items per domain, as the demo scores
EVAL_MATH = "eval.tasks=[{name: toy_math, n: 1, temperature: 0.0, top_p: 1.0, max_gen_toks: 320, limit: 96}]"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Failed(Exception):
    pass


class Procs:
    """Processes started from the repo root on one thread each, stdout and stderr to files under
    `logs`; those still running when the block ends (a failure) are killed."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.running = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> None:
        with (self.logs / f"{name}.out").open("w") as out, (self.logs / f"{name}.err").open("w") as err:
            self.running[name] = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err)

    def done(self, name: str, block: bool = True) -> str | None:
        """`name`'s stdout once it has exited 0 (without `block`: None while it runs); a failure
        raises with its command and stderr."""
        proc = self.running[name]
        if proc.poll() is None and not block:
            return None
        proc.wait()
        if proc.returncode != 0:
            err = (self.logs / f"{name}.err").read_text()[-3000:]
            raise Failed(f"{' '.join(map(str, proc.args))} failed:\n{err}")
        return (self.logs / f"{name}.out").read_text()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def score_cmd(model: Path, domain: str, world: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "branchmerge.toy.score", str(model), "--domain", domain),
        *("--toy-dir", str(world), "--threads", "1", "--limit", str(LIMIT)),
    ]


def run(out: Path) -> dict:
    world = out / "toy_world_hard"
    branches = {d: out / "train" / f"toy_{d}_branch" / "export" for d in DOMAINS}
    with Procs(out / "logs") as procs:
        for d in DOMAINS:  # started together: one builds the world, the others wait on its lock
            procs.start(
                f"train_{d}",
                [sys.executable, "train.py", f"+experiment=toy_{d}_branch", "logger=csv"]
                + ["trainer.progress_bar=false", f"paths.output_dir={out}"],
            )
        while not (world / "manifest.json").exists():  # the base is scored on the world they build
            for d in DOMAINS:
                procs.done(f"train_{d}", block=False)  # a training that failed before the world: raise
            time.sleep(1)
        for d in DOMAINS:
            procs.start(f"base_{d}", score_cmd(BASE, d, world))
        trained: set[str] = set()
        while len(trained) < len(DOMAINS):
            time.sleep(1)
            for d in sorted(set(DOMAINS) - trained):
                if procs.done(f"train_{d}", block=False) is not None:
                    trained.add(d)
                    procs.start(f"branch_{d}", score_cmd(branches[d], d, world))
            if "math" in trained and "eval_math" not in procs.running:
                cmd = [sys.executable, "evaluate.py", f"model_path={branches['math']}"]
                cmd += [f"paths.output_dir={out}", EVAL_MATH, "threads=1", f"paths.toy_dir={world}"]
                procs.start("eval_math", cmd)
        scores = {
            d: {kind: json.loads(procs.done(f"{kind}_{d}").splitlines()[-1]) for kind in ("base", "branch")}
            for d in DOMAINS
        }
        procs.done("eval_math")
    return {
        "scores": scores,
        "world": str(world),
        "eval_math": str(out / "eval" / "toy_math_branch_toy"),
    }


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run(out)
    except Failed as e:
        (out / "failed.txt").write_text(str(e))
        return 1
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
