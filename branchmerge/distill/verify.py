"""Verifiers per domain: is a teacher trace's final answer right?

    verify(record, kind) -> True (correct) | False (wrong) | None (cannot be checked: no reference/tests)

| kind | checks | with |
|---|---|---|
| math | the last `\\boxed{}` after `</think>` equals `reference` | math-verify (branchmerge.verify.graders.grade_math) |
| letter | the chosen option letter equals `reference` (one of A-Z) | branchmerge.verify.extract.extract_letter |
| code | the last ```python block passes `metadata.tests` ({inputs, outputs, fn_name?}) | the evaluation sandbox |
| toy | the toy domain's own verifier | branchmerge.toy |
| none | nothing (always True) | |

math-verify's parser arms a SIGALRM timeout, which only works in the main thread, so math and letter
run in the caller's thread; code runs in a thread pool (each test is its own sandboxed process).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from branchmerge.data.records import Record
from branchmerge.errors import ConfigError
from branchmerge.verify.extract import extract_letter, last_code_block
from branchmerge.verify.graders import PRELUDE, grade_code, grade_math, grade_toy
from branchmerge.verify.sandbox import Limits, run_python

KINDS = ("math", "letter", "code", "toy", "none")

_CALL = r"""
import json, sys
{program}

_tests = json.loads({tests!r})
_fn = globals().get({func!r})
if _fn is None and "Solution" in globals():
    _fn = getattr(Solution(), {func!r})
for _i, (_args, _want) in enumerate(_tests):
    _args = _args if isinstance(_args, list) else [_args]
    _got = _fn(*_args)
    if isinstance(_got, tuple):
        _got = list(_got)
    if not (_got == _want or [_got] == _want):
        print(f"FAIL {{_i}}", flush=True)
        sys.exit(1)
print("PASS")
"""


def _lines(x) -> str:
    return "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def verify_code(response: str, tests: dict, max_tests: int = 10, limits: Limits | None = None) -> bool:
    """APPS/TACO-style tests: stdin/stdout pairs, or call-based when `fn_name` is set."""
    pairs = list(zip(tests["inputs"], tests["outputs"]))[:max_tests]
    limits = limits or Limits(cpu_s=6, wall_s=12, memory_mb=1024)
    if tests.get("fn_name"):
        program = last_code_block(response, languages=("python", "py", "python3", ""))
        if program is None:
            return False
        src = PRELUDE + _CALL.format(program=program, tests=json.dumps(pairs), func=tests["fn_name"])
        r = run_python(src, limits=limits)
        return r.ok and r.stdout.strip().endswith("PASS")
    cases = [{"input": _lines(i), "output": _lines(o), "testtype": "stdin"} for i, o in pairs]
    return bool(grade_code(response, cases, limits=limits)["passed"])


def verify(record: Record, kind: str, max_tests: int = 10) -> bool | None:
    response = record.response or ""
    if kind == "none":
        return True
    if kind == "math":
        return grade_math(response, record.reference) if record.reference.strip() else None
    if kind == "letter":
        ref = record.reference.strip()
        return extract_letter(response, "ABCDEFGHIJ") == ref if len(ref) == 1 and ref.isalpha() else None
    if kind == "code":
        tests = record.metadata.get("tests")
        return verify_code(response, tests, max_tests) if tests and tests.get("inputs") else None
    if kind == "toy":
        return grade_toy(record.domain, response, record.reference, record.metadata)
    raise ConfigError(f"unknown verifier '{kind}'; choose one of {KINDS}")


def _grade_math_pair(pair: tuple[str, str]) -> bool | None:
    response, reference = pair
    return grade_math(response, reference) if reference.strip() else None


def verify_all(
    records: list[Record], kind: str, workers: int = 4, max_tests: int = 10, process_batch: int = 512
) -> list[bool | None]:
    """verify() for each record, in order.

    code/toy: a pool of `workers` threads (each test is its own sandboxed process). math: in this
    process's main thread, or, from `process_batch` records on, in `workers` spawned processes (each
    grades in its own main thread, where math-verify's timeout works): ~94k OpenR1 traces in minutes.
    """
    if kind in ("code", "toy") and workers > 1 and len(records) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda r: verify(r, kind, max_tests), records))
    if kind == "math" and workers > 1 and len(records) >= process_batch:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pairs = [(r.response or "", r.reference) for r in records]
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(_grade_math_pair, pairs, chunksize=64))
    return [verify(r, kind, max_tests) for r in records]
