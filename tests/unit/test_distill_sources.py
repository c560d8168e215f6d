"""Importers on fixture files in the public datasets' exact column formats (tests/fixtures/distill/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from branchmerge.data.records import validate_row
from branchmerge.distill.sources import MATH_PROMPT, BadRow, import_source, read_rows

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "distill"


def _split(items):
    items = list(items)
    recs = [x for x in items if not isinstance(x, BadRow)]
    return recs, [x for x in items if isinstance(x, BadRow)]


def test_openr1_math_picks_first_correct_generation_and_reports_bad_rows():
    recs, bad = _split(import_source("openr1_math", FIX / "openr1_math.jsonl"))
    assert len(recs) == 9 and len(bad) == 1
    assert bad[0].where == f"{FIX / 'openr1_math.jsonl'}:10" and "not valid JSON" in bad[0].why
    first = recs[0]
    assert first.id == "openr1-math-u1" and first.domain == "math" and first.reference == "7"
    assert first.messages[0]["content"] == f"Compute $3+4$.\n{MATH_PROMPT}"
    assert "\\boxed{7}" in first.response  # generation 1, the one marked correct, not generation 0
    assert first.metadata["generation_index"] == 1 and first.metadata["math_verify_correct"] is True
    assert first.metadata["question_type"] == "math-word-problem" and first.metadata["source"] == "olympiads"
    assert first.metadata["row"].endswith("openr1_math.jsonl:1")
    assert (
        recs[4].metadata["math_verify_correct"] is False
    )  # no correct generation: flagged, not dropped here
    for r in recs:  # every importer writes the one record schema
        assert validate_row(json.loads(r.to_json()), require_response=True) == []


def test_parquet_reads_like_jsonl():
    pq_recs, _ = _split(import_source("openr1_math", FIX / "openr1_math.parquet"))
    js_recs, _ = _split(import_source("openr1_math", FIX / "openr1_math.jsonl", limit=3))
    assert [r.messages for r in pq_recs] == [r.messages for r in js_recs]
    assert pq_recs[2].metadata["row"].endswith("openr1_math.parquet:3")


def test_openthoughts_metadata_think_format_and_tests():
    recs, bad = _split(import_source("openthoughts_metadata", FIX / "openthoughts_metadata.jsonl"))
    assert (
        len(recs) == 6 and len(bad) == 1 and "deepseek_solution" in bad[0].why and bad[0].where.endswith(":7")
    )
    code = recs[0]
    assert code.response.startswith("<think>\nLet me think.\n</think>\n\n```python")
    assert code.metadata["tests"] == {
        "inputs": ["2 3\n", "4 5\n"],
        "outputs": ["6\n", "20\n"],
        "fn_name": None,
    }
    assert recs[1].metadata["tests"]["fn_name"] == "twice"
    assert "tests" not in recs[3].metadata  # no test_cases
    assert recs[4].domain == "biology" and recs[4].reference == "42"


def test_openthoughts_default_conversations_to_think():
    recs, bad = _split(import_source("openthoughts", FIX / "openthoughts_default.jsonl", domain="math"))
    assert len(recs) == 1 and len(bad) == 1 and "user and an assistant" in bad[0].why
    assert recs[0].domain == "math"
    assert recs[0].response == "<think>\n2+2 is 4.\n</think>\n\n\\boxed{4}"


@pytest.mark.parametrize("name,n_ok,n_bad", [("s1k.jsonl", 3, 0), ("data_ablation_full59k.jsonl", 3, 1)])
def test_s1_seed_questions(name, n_ok, n_bad):
    recs, bad = _split(import_source("s1", FIX / name))
    assert (len(recs), len(bad)) == (n_ok, n_bad)
    assert all(r.response is None and r.messages[-1]["role"] == "user" for r in recs)  # seeds, no trace
    assert recs[0].metadata["cot_type"] in ("science", "math") and "source_type" in recs[0].metadata
    if n_bad:
        assert "cot_type" in bad[0].why


def test_read_rows_json_list_and_missing_file(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert list(read_rows(tmp_path / "rows.json")) == [(1, {"a": 1}), (2, {"a": 2})]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_rows(tmp_path / "nope.jsonl"))


def test_glob_path_reads_every_shard_in_order(tmp_path):
    lines = (FIX / "openr1_math.jsonl").read_text().splitlines()
    (tmp_path / "train-00000.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "train-00001.jsonl").write_text("\n".join(lines[2:4]) + "\n")
    recs, _ = _split(import_source("openr1_math", tmp_path / "train-*.jsonl"))
    assert [r.metadata["uuid"] for r in recs] == ["u1", "u2", "u3", "u4"]
    assert recs[2].metadata["row"].endswith("train-00001.jsonl:1")
