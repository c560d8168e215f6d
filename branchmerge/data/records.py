"""The one record schema that every dataset in branchmerge is stored in (JSONL, one record a line).

    {"id": "toy-math-train-000042",            # unique within a dataset
     "domain": "math" | "code" | "science" | ...,
     "source": "toy/math" | "open-r1/OpenR1-Math-220k" | ...,
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "reference": "28",                        # the gold answer a verifier compares against
     "metadata": {...}}                        # free-form: generator knobs, provenance, ...

Training sets end with an assistant turn (the teacher trace); evaluation sets may stop at the user turn.
The toy world and every importer write this schema, so the DataModule, the evaluator and the
distillation filters read one format. Reading reports malformed rows with file and line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from branchmerge.errors import ConfigError, DataError, MissingFileError
from branchmerge.foundation import atomic_write

ROLES = ("system", "user", "assistant")


class RecordError(DataError):
    """A dataset row that does not follow the record schema; the message names file and line."""


@dataclass(frozen=True)
class Record:
    id: str
    domain: str
    source: str
    messages: list[dict[str, str]]
    reference: str
    metadata: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user turn: what a model is asked."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def response(self) -> str | None:
        """The final assistant turn (the teacher trace), or None for prompt-only records."""
        last = self.messages[-1]
        return last["content"] if last["role"] == "assistant" else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


def validate_row(row: object, *, require_response: bool = False) -> list[str]:
    """Every problem with one decoded JSON row, as readable strings (empty list = valid)."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    for key, typ in (("id", str), ("domain", str), ("source", str), ("reference", str)):
        if key not in row:
            problems.append(f"missing key '{key}'")
        elif not isinstance(row[key], typ):
            problems.append(f"'{key}' must be a string, got {type(row[key]).__name__}")
    extra = set(row) - {"id", "domain", "source", "messages", "reference", "metadata"}
    if extra:
        problems.append(f"unknown keys {sorted(extra)}")
    if "metadata" in row and not isinstance(row["metadata"], dict):
        problems.append("'metadata' must be an object")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        problems.append("'messages' must be a non-empty list of {role, content}")
        return problems
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            problems.append(f"messages[{i}] must have exactly the keys role and content")
        elif m["role"] not in ROLES:
            problems.append(f"messages[{i}].role is '{m['role']}', expected one of {ROLES}")
        elif not isinstance(m["content"], str):
            problems.append(f"messages[{i}].content must be a string")
    if not problems and not any(m["role"] == "user" for m in msgs):
        problems.append("no user turn in 'messages'")
    if not problems and require_response and msgs[-1]["role"] != "assistant":
        problems.append(
            "no assistant turn at the end of 'messages': a training record needs the teacher's "
            "response to learn from"
        )
    return problems


def read_records(
    path: str | os.PathLike, *, require_response: bool = False, on_error: str = "raise"
) -> Iterator[Record]:
    """Yield records from a JSONL file.

    on_error="raise" stops at the first bad row with a RecordError naming file:line and every problem;
    on_error="skip" drops bad rows (use `read_records_counted` to know how many).
    """
    yield from _read(Path(path), require_response, on_error, skipped=None)


def read_records_counted(
    path: str | os.PathLike, *, require_response: bool = False
) -> tuple[list[Record], list[str]]:
    """All valid records and one 'file:line: problem' string per skipped row."""
    skipped: list[str] = []
    recs = list(_read(Path(path), require_response, "skip", skipped))
    return recs, skipped


def _read(path: Path, require_response: bool, on_error: str, skipped: list[str] | None):
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not path.is_file():
        raise MissingFileError(f"dataset file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems = validate_row(row, require_response=require_response)
            except json.JSONDecodeError as e:
                problems = [f"not valid JSON ({e.msg} at column {e.colno})"]
            if problems:
                msg = f"{path}:{lineno}: " + "; ".join(problems)
                if on_error == "raise":
                    raise RecordError(msg + " (fix the row, or set on_error=skip to drop bad rows)")
                if skipped is not None:
                    skipped.append(msg)
                continue
            yield Record(
                metadata=row.get("metadata", {}), **{k: v for k, v in row.items() if k != "metadata"}
            )


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records as JSONL atomically (temp file + rename); returns the count."""
    n = 0
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
            n += 1
    return n
