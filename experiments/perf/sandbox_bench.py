"""Sandbox cost: bubblewrap isolation vs the in-process guard, per program and for LiveCodeBench grading.

    python experiments/perf/sandbox_bench.py                 # ~1-2 min on 2 cores
    python experiments/perf/sandbox_bench.py --problems 300  # the full 300-problem x 4-sample run

1. Per-program overhead: the same trivial program (`print(sum(range(1000)))`) run `--runs` times one
   after another, isolation=process vs isolation=bwrap, interleaved in rounds; median wall per program.
2. Grading throughput: a synthetic LiveCodeBench run, `--problems` stdin problems x 4 samples, 8 tests
   each (output = the sum of the input numbers); per problem: 2 correct samples, 1 wrong at a random
   test, 1 that crashes on its first test (the mix of a ~50% pass@1 model). Graded as before this
   change (process isolation, one program at a time: `workers=1`) and as now (bwrap, programs of a
   question's samples concurrently on `sandbox.workers()` threads). Verdicts must agree.
Prints ratios side by side; writes experiments/perf/results/sandbox_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from branchmerge.verify import sandbox
from branchmerge.verify.graders import grade_code_many
from branchmerge.verify.sandbox import run_python

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "perf" / "results"
TRIVIAL = "print(sum(range(1000)))"
GOOD = "```python\nimport sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n```"
WRONG = "```python\nimport sys\nv = [int(x) for x in sys.stdin.read().split()]\nprint(sum(v) + (v[0] == {k}))\n```"
CRASH = "```python\nimport sys\nprint(1 / 0)\n```"


def per_program(runs: int, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Median and min seconds per trivial program for each isolation, interleaved in `rounds`."""
    times: dict[str, list[float]] = {"process": [], "bwrap": []}
    for _ in range(rounds):
        for iso in times:
            for _ in range(runs // rounds):
                t0 = time.perf_counter()
                r = run_python(TRIVIAL, isolation=iso)
                times[iso].append(time.perf_counter() - t0)
                assert r.stdout == "499500\n", r
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "n": len(v)} for k, v in times.items()}


def workload(problems: int, seed: int = 0) -> list[tuple[list[str], list[dict[str, str]]]]:
    """(4 responses, 8 stdin tests) per problem; test t of problem p starts with the number t."""
    rng = random.Random(seed)
    out = []
    for _ in range(problems):
        tests = []
        for t in range(8):
            nums = [t] + [rng.randint(-50, 50) for _ in range(rng.randint(3, 30))]
            tests.append({"input": " ".join(map(str, nums)), "output": str(sum(nums)), "testtype": "stdin"})
        out.append(([GOOD, GOOD, WRONG.format(k=rng.randint(0, 7)), CRASH], tests))
    return out


def grade(items, iso: str, workers: int) -> tuple[float, list[bool]]:
    sandbox.configure(iso, workers)
    t0 = time.perf_counter()
    verdicts = [g["passed"] for responses, tests in items for g in grade_code_many(responses, tests)]
    return time.perf_counter() - t0, verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="trivial programs per isolation")
    ap.add_argument("--problems", type=int, default=30)
    ap.add_argument("--out", default=str(RESULTS / "sandbox_bench.json"))
    args = ap.parse_args()
    sandbox.check()
    over = per_program(args.runs)
    ratio = over["bwrap"]["median_s"] / over["process"]["median_s"]
    print(f"per program (median of {args.runs}):  process {over['process']['median_s'] * 1e3:.1f} ms"
          f"   bwrap {over['bwrap']['median_s'] * 1e3:.1f} ms   bwrap/process {ratio:.2f}x")  # fmt: skip
    items = workload(args.problems)
    before_s, before_v = grade(items, "process", 1)
    now_workers = len(os.sched_getaffinity(0))
    now_s, now_v = grade(items, "bwrap", now_workers)
    assert before_v == now_v, "verdicts differ between the two gradings"
    n_resp = 4 * args.problems
    per300 = 1200 / n_resp
    print(f"grading {args.problems} problems x 4 samples x 8 tests ({sum(now_v)}/{n_resp} pass):"
          f"  before (process, 1 at a time) {before_s:.1f} s   now (bwrap, {now_workers} at a time)"
          f" {now_s:.1f} s   now/before {now_s / before_s:.2f}x"
          f"   (300 x 4 extrapolated: {before_s * per300:.0f} s -> {now_s * per300:.0f} s)")  # fmt: skip
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "bwrap": sandbox.provenance()["tool"],
        "per_program": over,
        "bwrap_over_process": ratio,
        "grading": {
            "problems": args.problems,
            "samples": 4,
            "tests": 8,
            "passed": sum(now_v),
            "before_process_1_worker_s": before_s,
            "now_bwrap_s": now_s,
            "now_workers": now_workers,
            "now_over_before": now_s / before_s,
            "extrapolated_300x4_s": {"before": before_s * per300, "now": now_s * per300},
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
