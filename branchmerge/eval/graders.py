"""Grading one response: the same code for lm-eval tasks, the toy verifiers and distillation filters.

- math (AIME): the last `\\boxed{}` after `</think>`, equivalence by math-verify (numbers, fractions,
  LaTeX); toy math compares integers.
- multiple choice (GPQA, toy science): the option letter (`extract_letter`).
- code (LiveCodeBench): the last ```python block after `</think>`, run in the sandbox against every
  public and private test; passes only if all pass.
"""

from __future__ import annotations

import json
from typing import Any

from branchmerge.eval.extract import extract_letter, last_boxed, last_code_block, normalize_output
from branchmerge.eval.sandbox import Limits, run_python


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
    program = last_code_block(response, languages=("python", "py", "python3", ""))
    if program is None:
        return {"passed": False, "reason": "no code block"}
    limits = limits or Limits(cpu_s=6, wall_s=12, memory_mb=1024)
    if func_name:  # LeetCode-style: call Solution().<func>(*args) for each test
        pairs = [(t["input"], t["output"]) for t in tests]
        src = PRELUDE + _FUNCTIONAL.format(program=program, tests=json.dumps(pairs), func=func_name)
        r = run_python(src, limits=limits)
        return {"passed": r.ok and r.stdout.strip().endswith("PASS"), "reason": r.reason or r.stdout[-200:]}
    for i, t in enumerate(tests):
        r = run_python(PRELUDE + program, stdin=t["input"], limits=limits)
        if not r.ok:
            return {"passed": False, "reason": f"test {i}: {r.status}: {r.reason}"}
        if normalize_output(r.stdout) != normalize_output(t["output"]):
            return {"passed": False, "reason": f"test {i}: wrong output"}
    return {"passed": True, "reason": ""}
