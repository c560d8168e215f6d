"""Run the toy code task's reference programs while the model is still generating, once per test set.

The toy code grader compares a response's last code block (the output the model predicts; the
response is not run) with the real output of the problem's program (`meta["program"]`), run in the
sandbox through `graders.run_program`, which remembers each output in the process (lru_cache).
lm-eval grades the documents one after another once generation ends; without help every program
starts then, one at a time. `ReferenceRuns` starts them on `sandbox.workers()` threads as soon as
the suite's tasks are built, last document first, so they run beside generation and lm-eval's
grading (first document first) meets programs already run. With a `store` (the generation cache,
branchmerge/eval/gencache.py) outputs of earlier evaluations are handed to the grader
(`graders.remember_outputs`) instead of being run again, and new ones are stored on `close()`: a
reference output depends on the program and the sandbox (`sandbox_identity`), not on the model.
Verdicts are unchanged: grading still calls the same function on the same program, and only
programs that ran to completion are stored.
"""

from __future__ import annotations

import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from branchmerge.verify import graders, sandbox


def reference_programs(docs: list[dict[str, Any]]) -> list[str]:
    """The distinct `meta["program"]` strings of toy code documents, in document order."""
    programs = []
    for doc in docs:
        meta = doc.get("meta")
        program = (json.loads(meta) if isinstance(meta, str) else meta or {}).get("program")
        if program:
            programs.append(program)
    return list(dict.fromkeys(programs))


def sandbox_identity() -> dict[str, Any]:
    """What an output may depend on besides the program: isolation, its tool, the interpreter."""
    prov = sandbox.provenance()
    return {k: prov[k] for k in ("isolation", "tool", "interpreter")} | {"python": platform.python_version()}


def program_key(program: str, identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([program, identity], sort_keys=True).encode()).hexdigest()


class ReferenceRuns:
    """Runs `programs` in the background, last first; `close()` drops the ones not yet started and
    stores the outputs of those that completed (with a `store`)."""

    def __init__(self, programs: list[str], workers: int | None = None, store: Any = None):
        self.store = store
        self.keys = {}
        if store is not None:
            identity = sandbox_identity()
            self.keys = {p: program_key(p, identity) for p in programs}
            found = store.get(list(self.keys.values()), table="program")
            graders.remember_outputs({p: found[k] for p, k in self.keys.items() if k in found})
            programs = [p for p in programs if self.keys[p] not in found]
        self.stored = len(self.keys) - len(programs)
        self.pool = ThreadPoolExecutor(max_workers=workers or sandbox.workers(), thread_name_prefix="ref")
        self.futures = {p: self.pool.submit(graders.run_program, p) for p in reversed(programs)}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.store is None:
            return
        ran = [(p, f) for p, f in self.futures.items() if f.done() and not f.cancelled()]
        done = {p: f.result() for p, f in ran if f.exception() is None}
        self.store.put_outputs([(self.keys[p], out) for p, out in done.items() if out is not None])

    def __enter__(self) -> ReferenceRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
