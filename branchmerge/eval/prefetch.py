"""Run the toy code task's reference programs while the model is still generating.

The toy code grader compares a response's last code block with the real output of the problem's
program (`meta["program"]`), run in the sandbox through `graders.run_program`, which remembers
each output in the process (lru_cache). lm-eval grades the documents one after another once
generation ends; without help every program starts then, one at a time. `ReferenceRuns` starts
them on `sandbox.workers()` threads as soon as the task's documents are known, last document
first, so they run beside generation and lm-eval's grading (first document first) meets programs
already run. Verdicts are unchanged: grading still calls the same function on the same program.
"""

from __future__ import annotations

import json
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


class ReferenceRuns:
    """Runs `programs` in the background, last first; `close()` drops the ones not yet started."""

    def __init__(self, programs: list[str], workers: int | None = None):
        self.pool = ThreadPoolExecutor(max_workers=workers or sandbox.workers(), thread_name_prefix="ref")
        self.futures = [self.pool.submit(graders.run_program, p) for p in reversed(programs)]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReferenceRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
