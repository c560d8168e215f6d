"""The record schema: round trip, and malformed rows reported with file and line."""

import json
import re

import pytest

from branchmerge.data.records import Record, RecordError, read_records, read_records_counted, write_records


def _rec(i, with_response=True):
    msgs = [{"role": "user", "content": f"q{i}"}]
    if with_response:
        msgs.append({"role": "assistant", "content": f"<think>t</think>a{i}"})
    return Record(
        id=f"r{i}", domain="math", source="test", messages=msgs, reference=str(i), metadata={"k": i}
    )


def test_round_trip(tmp_path):
    recs = [_rec(i) for i in range(5)]
    assert write_records(tmp_path / "d.jsonl", recs) == 5
    back = list(read_records(tmp_path / "d.jsonl", require_response=True))
    assert back == recs
    assert back[2].prompt == "q2" and back[2].response == "<think>t</think>a2"
    assert not (tmp_path / "d.jsonl.tmp").exists()


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_malformed_row_names_file_and_line(tmp_path):
    good = _rec(0).to_json()
    bad_rows = [
        ("{not json", "not valid JSON"),
        (json.dumps({"id": "x", "domain": "m", "source": "s", "reference": "1"}), "'messages'"),
        (json.dumps({**json.loads(good), "refrence": "1"}), "unknown keys ['refrence']"),
        (json.dumps({**json.loads(good), "messages": [{"role": "bot", "content": "x"}]}), "role is 'bot'"),
        (json.dumps({**json.loads(good), "reference": 3}), "'reference' must be a string"),
    ]
    for row, problem in bad_rows:
        path = tmp_path / "bad.jsonl"
        _write_lines(path, [good, good, row, good])
        with pytest.raises(RecordError, match=rf"bad.jsonl:3: .*{re.escape(problem)}"):
            list(read_records(path))


def test_missing_assistant_turn_is_an_error_for_training(tmp_path):
    path = tmp_path / "p.jsonl"
    write_records(path, [_rec(0), _rec(1, with_response=False)])
    assert len(list(read_records(path))) == 2  # fine as an evaluation set
    with pytest.raises(RecordError, match=r"p.jsonl:2: no assistant turn"):
        list(read_records(path, require_response=True))


def test_skip_mode_counts_bad_rows_and_keeps_the_rest(tmp_path):
    path = tmp_path / "mixed.jsonl"
    _write_lines(path, [_rec(0).to_json(), "[]", _rec(1).to_json(), "{", _rec(2).to_json()])
    recs, skipped = read_records_counted(path)
    assert [r.id for r in recs] == ["r0", "r1", "r2"]
    assert len(skipped) == 2 and skipped[0].startswith(f"{path}:2:") and skipped[1].startswith(f"{path}:4:")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        list(read_records(tmp_path / "nope.jsonl"))
