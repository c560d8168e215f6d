"""Teacher backends and the resumable generation journal they all write through.

    teacher = build_teacher(cfg.teacher)                  # openai | vllm | hf | toy
    results = generate(teacher, requests, journal_path, settings)   # -> {request key: GenResult}

A request asks for `n` samples for one question (`GenRequest`). Each finished request is appended to
the journal (one JSON line, flushed and fsynced) *before* it counts as done; a restarted job reads the
journal and sends only the requests that are not in it, so no finished request is ever paid for twice.
The journal's first line records the teacher settings; resuming with different settings is an error
(delete the journal to regenerate). A torn last line (the process died mid-write) is cut off.

Seeds: every request gets its own, `request_seed(teacher.seed, key)`, a hash of the teacher's seed and
the request key ("<id>" or "<id>#<k>"), so sample k of a question sent alone never repeats sample 0,
and a resumed job re-sends exactly the requests it would have sent. Each sample records its seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from branchmerge import errors
from branchmerge.errors import ConfigError

log = logging.getLogger(__name__)


class TeacherError(errors.TeacherError):
    """Some requests failed after every retry; what finished is in the journal (rerun to resume)."""


@dataclass(frozen=True)
class GenRequest:
    key: str  # unique request key (seed record id, or "<id>#<k>" when samples are sent one per request)
    seed_id: str
    messages: list[dict[str, str]]
    n: int


@dataclass
class GenResult:
    key: str
    seed_id: str
    samples: list[dict[str, Any]]  # [{"text": str, "finish_reason": "stop" | "length" | ..., "seed"}] * n
    usage: dict[str, int] = field(default_factory=dict)
    model: str = ""


def request_seed(base: int | None, key: str) -> int | None:
    """The seed of one request: the first 31 bits of sha256("<base>/<key>"); None when base is None
    (no seed sent: the backend draws its own, and samples are not reproducible)."""
    if base is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{base}/{key}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def with_seed(samples: list[dict[str, Any]], seed: int | None) -> list[dict[str, Any]]:
    """The samples of one request, each recording the seed the request was sent with."""
    return [{**s, "seed": seed} for s in samples]


class Teacher(Protocol):
    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        """Generate every request, calling on_done(result) as each finishes; return the failed keys."""
        ...


class Journal:
    """Append-only JSONL of finished requests: a settings header, then one GenResult per line."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, GenResult] = {}
        if self.path.exists():
            self._load(settings)
        else:
            with self.path.open("w", encoding="utf-8") as f:
                f.write(json.dumps({"_settings": settings}, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._f = self.path.open("a", encoding="utf-8")

    def _load(self, settings: dict[str, Any]) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn write: keep only whole lines
            cut = data.rfind(b"\n") + 1
            log.warning("journal %s: dropping a torn last line (%d bytes)", self.path, len(data) - cut)
            with self.path.open("r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        lines = data.decode("utf-8").splitlines()
        header = json.loads(lines[0]).get("_settings") if lines else None
        if header is not None and header != settings:
            raise ConfigError(
                f"journal {self.path} was written with other teacher settings:\n  {header}\nnow:\n  "
                f"{settings}\nDelete it to regenerate, or restore the settings to resume."
            )
        for line in lines[1:]:
            r = GenResult(**json.loads(line))
            self.done[r.key] = r

    def append(self, result: GenResult) -> None:
        if result.key in self.done:
            raise RuntimeError(f"request {result.key} finished twice")
        self._f.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[result.key] = result

    def close(self) -> None:
        self._f.close()


def generate(
    teacher: Callable[[], Teacher],
    requests: list[GenRequest],
    journal_path: str | Path,
    settings: dict[str, Any],
) -> tuple[dict[str, GenResult], list[str]]:
    """Results of every request (from the journal or newly generated) and the keys that failed.

    `teacher` is called for the backend only when some request is pending (a finished job loads no model).
    """
    journal = Journal(journal_path, settings)
    try:
        pending = [r for r in requests if r.key not in journal.done]
        log.info(
            "teacher: %d requests, %d already in %s, %d to send",
            len(requests),
            len(requests) - len(pending),
            journal_path,
            len(pending),
        )
        bar = tqdm(total=len(pending), desc="teacher requests", unit="req", disable=None)

        def done(result: GenResult) -> None:
            journal.append(result)  # on disk first, then counted
            bar.update(1)

        try:
            failed = teacher().run(pending, done) if pending else []
        finally:
            bar.close()
        return dict(journal.done), failed
    finally:
        journal.close()


def build_teacher(cfg: Any, **kwargs) -> Teacher:
    """The backend named by cfg.name (imports lazily: vllm only when asked for)."""
    if cfg.name == "openai":
        from branchmerge.distill.teachers.openai_api import OpenAITeacher

        return OpenAITeacher(cfg)
    if cfg.name == "hf":
        from branchmerge.distill.teachers.local import HFTeacher

        return HFTeacher(cfg)
    if cfg.name == "vllm":
        from branchmerge.distill.teachers.local import VLLMTeacher

        return VLLMTeacher(cfg)
    if cfg.name == "toy":
        from branchmerge.distill.teachers.local import ToyTeacher

        return ToyTeacher(cfg, **kwargs)
    raise ConfigError(f"unknown teacher '{cfg.name}'")
