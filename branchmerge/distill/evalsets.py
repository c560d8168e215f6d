"""The evaluation questions a training set must not contain (decontamination), as plain texts.

    eval_texts(["aime24", "gpqa_diamond", "livecodebench", "toy"], data_dir, toy_dir)
        -> {"aime24": [problem, ...], "gpqa_diamond": [Question, ...], "livecodebench": [...], "toy:math": [...]}

Files are the evaluator's (branchmerge/data/benchmarks.py): <data_dir>/aime_2024.jsonl, gpqa_diamond.csv,
livecodebench.jsonl (every problem, not only the paper's date window), and the toy world's
<toy_dir>/data/<domain>/test.jsonl. A missing file is an error naming where to put it, or (missing=skip)
a warning, and the set is then absent from the manifest's `decontam_sets`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from branchmerge.data.benchmarks import SOURCES, read_rows
from branchmerge.data.records import read_records
from branchmerge.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)
QUESTION_COLUMN = {"aime24": "problem", "gpqa_diamond": "Question", "livecodebench": "question_content"}


def _missing(what: str, path: Path, hint: str, missing: str) -> None:
    msg = f"decontamination set {what}: {path} not found ({hint})"
    if missing == "raise":
        raise MissingFileError(msg + "; or set selection.decontam.missing=skip")
    log.warning("%s; skipped", msg)


def eval_texts(
    sets: list[str], data_dir: str | None, toy_dir: str | None, missing: str = "raise"
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in sets:
        if name == "toy":
            files = sorted(Path(toy_dir or "").glob("data/*/test.jsonl"))
            if not files:
                _missing(
                    "toy", Path(toy_dir or "") / "data", "python distill.py +experiment=toy_data", missing
                )
            for f in files:
                out[f"toy:{f.parent.name}"] = [r.prompt for r in read_records(f)]
            continue
        if name not in QUESTION_COLUMN:
            raise ConfigError(f"unknown decontamination set '{name}'; known: {[*QUESTION_COLUMN, 'toy']}")
        fname, hint = SOURCES[name]
        path = Path(data_dir or "") / fname
        if not path.exists():
            _missing(name, path, hint, missing)
            continue
        out[name] = [str(r[QUESTION_COLUMN[name]]) for r in read_rows(path)]
    return out
