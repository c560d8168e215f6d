"""Run an entry script under a Python audit hook that logs every file opened below one folder, with
the branchmerge functions on the stack at that moment (innermost first):

    python -m tests.file_audit <log.jsonl> <watched folder> merge.py <arguments...>

One JSON line per open: {"path", "mode", "chain": ["read_records", "load_toy", ...]}. Tests read it to
see which dataset files a run opened and which code opened them.
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def install(log: str, watched: str) -> None:
    """Log opens of files under `watched` to `log` (opened before the hook, so never logged itself)."""
    root = os.path.realpath(watched) + os.sep
    out = open(log, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if not path.startswith(root):
            return
        chain, frame = [], sys._getframe(1)
        while frame is not None:
            if f"{os.sep}branchmerge{os.sep}" in frame.f_code.co_filename:
                chain.append(frame.f_code.co_name)
            frame = frame.f_back
        out.write(json.dumps({"path": path, "mode": str(args[1]), "chain": chain}) + "\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    log_file, folder, script, *argv = sys.argv[1:]
    install(log_file, folder)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
