"""Importers: public trace / seed datasets from local JSON, JSONL or parquet files -> the record schema.

| format | dataset (hub id, config) | one row becomes |
|---|---|---|
| openr1_math | open-r1/OpenR1-Math-220k, `default` | problem + its first generation that math-verify marked correct and whose reasoning is complete (else the first generation), reference = `answer` |
| openthoughts_metadata | open-thoughts/OpenThoughts-114k, `metadata` | problem, `<think>deepseek_reasoning</think>` + deepseek_solution; code tests from `test_cases` |
| openthoughts | open-thoughts/OpenThoughts-114k, `default` | the user turn, the assistant turn with `<\\|begin_of_thought\\|>` blocks rewritten as `<think>` |
| s1 | simplescaling/s1K and simplescaling/data_ablation_full59K | question (a seed: no trace), reference = `solution` |
| records | our record schema (e.g. the toy world's files) | itself |

Every record keeps its provenance in metadata: `row` ("file:row", 1-based), the dataset's selection
columns (question_type, source, domain, cot_type, ...), so `select:` in the config can filter on them.
A row that cannot be converted (missing column, wrong type, invalid JSON) is a `BadRow` with file and
row number; `on_bad_row=raise` turns the first one into an `InputError`.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchmerge.data.records import Record, validate_row
from branchmerge.errors import ConfigError, DataError, MissingFileError

MATH_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_INSTRUCTION = {"openr1_math": MATH_PROMPT}


class InputError(DataError):
    """A malformed input row under on_bad_row=raise; the message names file and row."""


class _Bad(Exception):
    """Raised by a converter: the row does not have the dataset's columns."""


@dataclass(frozen=True)
class BadRow:
    where: str  # "file:row"
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


def expand(path: str | Path) -> list[Path]:
    """The files a source `path` names: itself, or the sorted matches of a glob (data/train-*.parquet)."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise MissingFileError(f"no input file matches {text}")
        return files
    if not Path(text).is_file():
        raise MissingFileError(f"input file {text} does not exist")
    return [Path(text)]


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, decoded row) from .jsonl, .json (a list of objects) or .parquet.

    An undecodable JSONL line yields (row, _Bad(...)) instead of a dict, so the caller counts it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"input file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for r in batch.to_pylist():
                row += 1
                yield row, r
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    else:
        with path.open(encoding="utf-8") as f:
            for row, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield row, json.loads(line)
                except json.JSONDecodeError as e:
                    yield row, _Bad(f"not valid JSON ({e.msg} at column {e.colno})")


def _get(row: dict, key: str, typ: type | tuple[type, ...], optional: bool = False) -> Any:
    if key not in row or row[key] is None:
        if optional:
            return None
        raise _Bad(f"missing column '{key}'")
    if not isinstance(row[key], typ):
        raise _Bad(f"column '{key}' must be {getattr(typ, '__name__', typ)}, got {type(row[key]).__name__}")
    return row[key]


def _prompt(text: str, instruction: str) -> str:
    return f"{text.strip()}\n{instruction}" if instruction else text.strip()


def _think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.strip()}"


def _openr1_math(row: dict, rid: str, instruction: str) -> Record:
    problem, answer = _get(row, "problem", str), _get(row, "answer", str)
    gens = _get(row, "generations", list)
    correct = _get(row, "correctness_math_verify", list)
    complete = _get(row, "is_reasoning_complete", list, optional=True) or [True] * len(gens)
    if not gens or len(correct) != len(gens) or not all(isinstance(g, str) for g in gens):
        raise _Bad("'generations' must be a non-empty list of strings as long as 'correctness_math_verify'")
    ok = [i for i, (c, d) in enumerate(zip(correct, complete)) if c is True and d is not False]
    pick = ok[0] if ok else 0
    meta = {k: row.get(k) for k in ("question_type", "problem_type", "source", "uuid")}
    meta |= {"generation_index": pick, "n_generations": len(gens), "math_verify_correct": bool(ok)}
    reasons = row.get("finish_reasons")
    if isinstance(reasons, list) and len(reasons) == len(gens) and reasons[pick]:
        meta["finish_reason"] = reasons[pick]  # "length": truncated, removed by the format filter
    return Record(
        id=f"openr1-math-{row.get('uuid') or rid}",
        domain="math",
        source="open-r1/OpenR1-Math-220k",
        messages=[{"role": "user", "content": _prompt(problem, instruction)}, _assistant(gens[pick])],
        reference=answer.strip(),
        metadata=meta,
    )


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def parse_test_cases(raw: Any) -> dict | None:
    """OpenThoughts / APPS / TACO `test_cases`: JSON {"inputs": [...], "outputs": [...], "fn_name"?}."""
    if not raw:
        return None
    try:
        tc = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return None
    if not isinstance(tc, dict) or not isinstance(tc.get("inputs"), list):
        return None
    if not isinstance(tc.get("outputs"), list) or len(tc["outputs"]) != len(tc["inputs"]):
        return None
    return {"inputs": tc["inputs"], "outputs": tc["outputs"], "fn_name": tc.get("fn_name")}


def _openthoughts_metadata(row: dict, rid: str, instruction: str) -> Record:
    problem, domain = _get(row, "problem", str), _get(row, "domain", str)
    reasoning, solution = _get(row, "deepseek_reasoning", str), _get(row, "deepseek_solution", str)
    tests = parse_test_cases(row.get("test_cases")) if domain == "code" else None
    meta = {"domain": domain, "source": row.get("source"), "starter_code": row.get("starter_code") or ""}
    if tests:
        meta["tests"] = tests
    return Record(
        id=f"openthoughts-{rid}",
        domain=domain,
        source="open-thoughts/OpenThoughts-114k",
        messages=[
            {"role": "user", "content": _prompt(problem, instruction)},
            _assistant(_think(reasoning, solution)),
        ],
        reference=(row.get("ground_truth_solution") or "") if domain != "code" else "",
        metadata=meta,
    )


_OT_BLOCK = re.compile(
    r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>\s*<\|begin_of_solution\|>(.*?)<\|end_of_solution\|>",
    re.DOTALL,
)


def _openthoughts(row: dict, rid: str, instruction: str) -> Record:
    conv = _get(row, "conversations", list)
    turns = {t.get("from"): t.get("value") for t in conv if isinstance(t, dict)}
    if not isinstance(turns.get("user"), str) or not isinstance(turns.get("assistant"), str):
        raise _Bad("'conversations' needs a user and an assistant turn ({from, value})")
    m = _OT_BLOCK.search(turns["assistant"])
    if m is None:
        raise _Bad("assistant turn has no <|begin_of_thought|>…<|end_of_solution|> blocks")
    return Record(
        id=f"openthoughts-{rid}",
        domain="unknown",
        source="open-thoughts/OpenThoughts-114k",
        messages=[
            {"role": "user", "content": _prompt(turns["user"], instruction)},
            _assistant(_think(m.group(1), m.group(2))),
        ],
        reference="",
        metadata={},
    )


def _s1(row: dict, rid: str, instruction: str) -> Record:
    question, cot_type = _get(row, "question", str), _get(row, "cot_type", str)
    return Record(
        id=f"s1-{rid}",
        domain="science" if cot_type == "science" else cot_type,
        source="simplescaling/s1",
        messages=[{"role": "user", "content": _prompt(question, instruction)}],
        reference=(row.get("solution") or "").strip(),
        metadata={
            "cot_type": cot_type,
            "source_type": row.get("source_type"),
            "s1_metadata": row.get("metadata"),
        },
    )


def _records(row: dict, rid: str, instruction: str) -> Record:
    problems = validate_row(row)
    if problems:
        raise _Bad("; ".join(problems))
    return Record(metadata=row.get("metadata", {}), **{k: v for k, v in row.items() if k != "metadata"})


CONVERTERS = {
    "openr1_math": _openr1_math,
    "openthoughts_metadata": _openthoughts_metadata,
    "openthoughts": _openthoughts,
    "s1": _s1,
    "records": _records,
}


def import_source(
    fmt: str,
    path: str | Path,
    *,
    domain: str | None = None,
    instruction: str | None = None,
    limit: int | None = None,
    tag: str = "",
) -> Iterator[Record | BadRow]:
    """Records (or BadRows) of one file, in file order; `domain` overrides the row's, `limit` caps rows.

    Record ids are "<prefix>-<tag><row>" unless the dataset has its own id (uuid, record id).
    """
    if fmt not in CONVERTERS:
        raise ConfigError(f"unknown source format '{fmt}'; known: {sorted(CONVERTERS)}")
    convert = CONVERTERS[fmt]
    instruction = DEFAULT_INSTRUCTION.get(fmt, "") if instruction is None else instruction
    rows = ((i, f, row, data) for i, f in enumerate(expand(path)) for row, data in read_rows(f))
    many = len(expand(path)) > 1
    for n, (i, file, row, data) in enumerate(rows):
        if limit is not None and n >= limit:
            return
        where = f"{file}:{row}"
        try:
            if isinstance(data, _Bad):
                raise data
            if not isinstance(data, dict):
                raise _Bad(f"expected an object, got {type(data).__name__}")
            rec = convert(data, f"{tag}{f'{i}-' if many else ''}{row:07d}", instruction)
        except _Bad as e:
            yield BadRow(where, str(e))
            continue
        meta = {**rec.metadata, "row": where}
        yield Record(rec.id, domain or rec.domain, rec.source, rec.messages, rec.reference, meta)
