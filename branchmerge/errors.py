"""The errors a user can cause, one family: catch `BranchmergeError` to catch any of them.

    BranchmergeError
    ├── ConfigError       a key's value or a combination of keys (also a ValueError)
    ├── DataError         a row or file of input data (also a ValueError)
    │   └── MissingFileError  an input file or folder that does not exist (also a FileNotFoundError)
    ├── CheckpointError   a model folder: missing or corrupt file, shapes, vocabularies (also a ValueError)
    ├── MergeRecipeError  a merge recipe: methods, parameters, models (also a ValueError)
    ├── EvaluationError   an evaluation that cannot run or whose output is unusable (also a ValueError)
    ├── SandboxError      the code sandbox is unavailable (also a RuntimeError)
    └── TeacherError      teacher requests that failed after every retry (also a RuntimeError)

Every message names the file / key / tensor / row at fault and the fix. The entry points run inside
`reported()`, which prints such an error as `error: <Kind>: <message>` without a traceback and exits
with status 1 (`HYDRA_FULL_ERROR=1` lets it propagate with its traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class BranchmergeError(Exception):
    """A problem the user can fix; the message says where and how."""


class ConfigError(BranchmergeError, ValueError):
    """A bad configuration value; `problems` holds one line per problem when several were found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class DataError(BranchmergeError, ValueError):
    """A bad input row or data file."""


class MissingFileError(DataError, FileNotFoundError):
    """An input file or folder that does not exist; the message says how to make or get it."""


class CheckpointError(BranchmergeError, ValueError):
    """A model folder that cannot be used."""


class MergeRecipeError(BranchmergeError, ValueError):
    """A merge recipe that cannot run."""


class EvaluationError(BranchmergeError, ValueError):
    """An evaluation that cannot run."""


class SandboxError(BranchmergeError, RuntimeError):
    """The code sandbox cannot run programs safely."""


class TeacherError(BranchmergeError, RuntimeError):
    """Teacher requests failed after every retry."""


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn a BranchmergeError into one message on stderr and exit status 1 (HYDRA_FULL_ERROR=1: raise)."""
    try:
        yield
    except BranchmergeError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(f"error: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
