"""Grading one response: the same code for lm-eval tasks, the toy verifiers and distillation filters.

- math (AIME): the last `\\boxed{}` after `</think>`, equivalence by math-verify (numbers, fractions,
  LaTeX); toy math compares integers.
- multiple choice (GPQA, toy science): the option letter (`extract_letter`).
- code (LiveCodeBench): the last ```python block after `</think>`, run in the sandbox against every
  public and private test; passes only if all pass. `grade_code_many` grades a question's samples
  together: their programs run concurrently (bounded by `sandbox.workers`, the CPU count by
  default), with the same verdicts and reasons as one-by-one grading.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from functools import lru_cache
from typing import Any

from branchmerge.verify import sandbox
from branchmerge.verify.extract import extract_letter, last_boxed, last_code_block, normalize_output
from branchmerge.verify.sandbox import Limits, run_python


def grade_math(response: str, answer: str) -> bool:
    got = last_boxed(response)
    if got is None:
        return False
    if got.strip() == str(answer).strip():
        return True
    import threading

    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set: elsewhere it silently
    # returned False for every answer, so worker threads grade without the timeout.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${answer}$", parsing_timeout=timeout)
        pred = parse(f"$\\boxed{{{got}}}$", parsing_timeout=timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on unparsable LaTeX: an unparsable answer is wrong
        return False


def grade_letter(response: str, letter: str, letters: str = "ABCD") -> bool:
    return extract_letter(response, letters) == letter


PRELUDE = (
    "import sys, math, heapq, bisect, itertools, functools, collections, string, re\n"
    "from typing import *\nfrom collections import *\nfrom itertools import *\nfrom functools import *\n"
)

_FUNCTIONAL = r"""
import json, sys
{program}

_tests = json.loads({tests!r})
_cls = Solution()
_fn = getattr(_cls, {func!r})
for _i, (_inp, _out) in enumerate(_tests):
    _args = [json.loads(line) for line in _inp.split("\n") if line.strip()]
    _got = _fn(*_args)
    if _got != json.loads(_out):
        print(f"FAIL {{_i}}", flush=True)
        sys.exit(1)
print("PASS")
"""


def grade_code(
    response: str, tests: list[dict[str, str]], func_name: str | None = None, limits: Limits | None = None
) -> dict[str, Any]:
    """Run the last python block against tests [{input, output, testtype}]; all must pass."""
    return grade_code_many([response], tests, func_name, limits)[0]


def grade_code_many(
    responses: list[str],
    tests: list[dict[str, str]],
    func_name: str | None = None,
    limits: Limits | None = None,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """grade_code for each response, all programs on one pool of `workers` threads (default
    sandbox.workers()). A stdin-style response fails at its first failing test in order: every test
    before it runs, later ones still queued are cancelled once a failure is known."""
    limits = limits or Limits(cpu_s=6, wall_s=12, memory_mb=1024)
    programs = [last_code_block(r, languages=("python", "py", "python3", "")) for r in responses]
    out: list[dict[str, Any] | None] = [
        None if p is not None else {"passed": False, "reason": "no code block"} for p in programs
    ]
    jobs = _code_jobs(programs, tests, func_name)  # (response, test, source, stdin), test-major
    fails: dict[int, tuple[int, str]] = {}  # response -> (first failing test, reason)
    with ThreadPoolExecutor(max_workers=workers or sandbox.workers()) as pool:
        futs: dict[Future, tuple[int, int]] = {
            pool.submit(run_python, src, stdin, limits): (ri, ti) for ri, ti, src, stdin in jobs
        }
        for fut in as_completed(futs):
            if fut.cancelled():
                continue
            ri, ti = futs[fut]
            why = _code_failure(fut.result(), tests[ti] if not func_name else None)
            if why is not None and ti < fails.get(ri, (len(tests) + 1, ""))[0]:
                fails[ri] = (ti, why)
                for f, (rj, tj) in futs.items():
                    if rj == ri and tj > ti:
                        f.cancel()
    for ri, (ti, why) in fails.items():
        out[ri] = {"passed": False, "reason": why if func_name else f"test {ti}: {why}"}
    return [r or {"passed": True, "reason": ""} for r in out]


def _code_jobs(
    programs: list[str | None], tests: list[dict[str, str]], func_name: str | None
) -> list[tuple[int, int, str, str]]:
    """One program per response (LeetCode-style: Solution().<func>(*args) over every test) or one
    per (response, stdin test), ordered test by test so every response's early tests run first."""
    live = [(ri, p) for ri, p in enumerate(programs) if p is not None]
    if func_name:
        pairs = json.dumps([(t["input"], t["output"]) for t in tests])
        return [
            (ri, 0, PRELUDE + _FUNCTIONAL.format(program=p, tests=pairs, func=func_name), "")
            for ri, p in live
        ]
    return [(ri, ti, PRELUDE + p, t["input"]) for ti, t in enumerate(tests) for ri, p in live]


def _code_failure(r: Any, test: dict[str, str] | None) -> str | None:
    """None if the run passed; else the reason (functional runs print PASS after every test)."""
    if test is None:
        return None if r.ok and r.stdout.strip().endswith("PASS") else (r.reason or r.stdout[-200:])
    if not r.ok:
        return f"{r.status}: {r.reason}"
    if normalize_output(r.stdout) != normalize_output(test["output"]):
        return "wrong output"
    return None


# The toy world's verifiers: the toy domains, the toy evaluation tasks and distillation all grade with
# these, so none of them has to import another's package.


def grade_toy_math(response: str, reference: str) -> bool:
    """The integer in the last `\\boxed{}` equals the reference (commas, spaces and a leading + ignored)."""
    got = last_boxed(response)
    if got is None:
        return False
    got = got.replace(",", "").replace(" ", "").removeprefix("+")
    try:
        return int(got) == int(reference)
    except ValueError:
        return False


def grade_toy_letter(response: str, reference: str, letters: str = "ABCD") -> bool:
    return extract_letter(response, letters) == reference


_known_outputs: dict[tuple[str, float], str] = {}


def remember_outputs(outputs: dict[str, str], timeout_s: float = 5.0) -> None:
    """Stdouts of programs that already ran to completion in this sandbox setup (an evaluation's
    persistent store): `run_program` returns them instead of running the program again."""
    _known_outputs.update(((program, timeout_s), out) for program, out in outputs.items())


@lru_cache(maxsize=4096)
def run_program(program: str, timeout_s: float = 5.0) -> str | None:
    """The program's real stdout from a separate sandboxed process; None if it failed or timed out."""
    known = _known_outputs.get((program, timeout_s))
    if known is not None:
        return known
    result = run_python(program, timeout_s=timeout_s)
    return result.stdout if result.status == "ok" else None


def grade_toy_output(response: str, reference: str, program: str | None = None) -> bool:
    """The response's last code block equals the real output of `program` run in the sandbox (without a
    program: `reference`), after normalising whitespace."""
    got = last_code_block(response)
    if got is None:
        return False
    expected = reference if program is None else run_program(program)
    return expected is not None and normalize_output(got) == normalize_output(expected)


def grade_toy(domain: str, response: str, reference: str, meta: dict | None = None) -> bool:
    """Grade a response to a toy problem of `domain` (math, code or science)."""
    if domain == "math":
        return grade_toy_math(response, reference)
    if domain == "science":
        return grade_toy_letter(response, reference)
    if domain == "code":
        return grade_toy_output(response, reference, (meta or {}).get("program"))
    raise KeyError(f"unknown toy domain '{domain}'; known: ['code', 'math', 'science']")
