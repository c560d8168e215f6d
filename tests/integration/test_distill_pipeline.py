"""`distill.py` on fixture files: per-reason counts add up, planted items are removed, bad rows are
counted or stop the job (naming file and row) without losing what was written, the toy teacher resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from branchmerge.data.records import read_records, write_records
from branchmerge.distill.pipeline import run
from branchmerge.distill.sources import InputError
from tests.conftest import ROOT, TOY_BASE, compose

FIX = ROOT / "tests" / "fixtures" / "distill"
EVAL = ROOT / "tests" / "fixtures" / "eval"
MATH = {
    "verifier": "math",
    "sources": [
        {
            "format": "openr1_math",
            "path": str(FIX / "openr1_math.jsonl"),
            "select": {"question_type": ["math-word-problem"], "math_verify_correct": [True]},
        }
    ],
}
CODE = {
    "verifier": "code",
    "sources": [
        {
            "format": "openthoughts_metadata",
            "path": str(FIX / "openthoughts_metadata.jsonl"),
            "select": {"domain": ["code"]},
        }
    ],
}


def distill_cfg(tmp_path: Path, domains: dict, overrides: list[str] = ()):
    cfg = compose(
        "distill",
        [
            f"paths.root_dir={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
            f"student_tokenizer={TOY_BASE}",
            "selection.max_tokens=2048",
            f"selection.decontam.eval_data_dir={EVAL}",
            "selection.decontam.sets=[aime24,gpqa_diamond,livecodebench]",
            *overrides,
        ],
        run_dir=tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.domains = OmegaConf.create(domains)
    return cfg


def removed(out: Path, domain: str) -> dict[str, str]:
    rows = [json.loads(x) for x in (out / domain / "removed.jsonl").read_text().splitlines()]
    return {r["id"]: r["reason"] for r in rows}


def test_counts_add_up_and_planted_items_are_removed(tmp_path):
    manifest = run(distill_cfg(tmp_path, {"math": MATH, "code": CODE}))
    out = tmp_path / "out"
    math = json.loads((out / "math" / "stats.json").read_text())["traces"]
    assert math["removed"] == {
        "bad_row": 1,
        "select": 2,
        "format": 1,
        "length": 1,
        "decontam": 1,
        "verify": 1,
        "duplicate": 1,
        "near_duplicate": 0,
    }
    assert math["input"] == 10 == sum(math["removed"].values()) + math["kept"]
    why = removed(out, "math")
    assert why["openr1-math-u3"] == "decontam"  # the planted AIME 2024 problem
    assert why["openr1-math-u4"] == "verify"  # the planted wrong answer (flagged correct in the dataset)
    assert why[f"{FIX / 'openr1_math.jsonl'}:10"] == "bad_row"
    bad_rows = json.loads((out / "math" / "stats.json").read_text())["bad_rows"]
    assert len(bad_rows) == 1 and bad_rows[0].startswith(f"{FIX / 'openr1_math.jsonl'}:10: not valid JSON (")
    kept = list(read_records(out / "math" / "train.jsonl", require_response=True))
    assert [r.id for r in kept] == ["openr1-math-u1", "openr1-math-u8"]  # u8: 0.75 == \frac{3}{4}

    code = manifest["stats"]["code"]["traces"]
    assert code["input"] == 7 == sum(code["removed"].values()) + code["kept"]
    assert (code["removed"]["bad_row"], code["removed"]["select"], code["removed"]["decontam"]) == (1, 1, 1)
    assert (
        code["removed"]["verify"] == 2 and code["kept"] == 2
    )  # wrong program; no tests (dropped by default)
    code_kept = list(read_records(out / "code" / "train.jsonl"))
    assert all("tests" not in r.metadata and r.metadata["n_tests"] == 2 for r in code_kept)

    disk = json.loads((out / "manifest.json").read_text())
    assert disk["decontam_sets"] == {"aime24": 3, "gpqa_diamond": 3, "livecodebench": 3}
    assert {Path(i["path"]).name for i in disk["inputs"]} == {
        "openr1_math.jsonl",
        "openthoughts_metadata.jsonl",
    }
    assert all(len(i["sha256"]) == 64 for i in disk["inputs"]) and "git_revision" in disk
    assert not list(out.rglob("*.tmp"))


def test_bad_row_raise_names_file_and_row_and_keeps_finished_output(tmp_path):
    first = {
        "verifier": "math",
        "sources": [{"format": "openr1_math", "path": str(FIX / "openr1_math.parquet")}],
    }
    cfg = distill_cfg(tmp_path, {"math": first, "code": CODE}, ["on_bad_row=raise"])
    with pytest.raises(
        InputError, match=r"openthoughts_metadata\.jsonl:7: missing column 'deepseek_solution'"
    ):
        run(cfg)
    out = tmp_path / "out"
    stats = json.loads((out / "math" / "stats.json").read_text())
    assert (
        len(list(read_records(out / "math" / "train.jsonl"))) == stats["kept"] == 1
    )  # u1 (u2: no answer, u3: AIME)
    assert list(json.loads((out / "manifest.json").read_text())["stats"]) == ["math"]
    assert not (out / "code" / "train.jsonl").exists() and not list(out.rglob("*.tmp"))


def _tiny_toy_world(root: Path) -> Path:
    """A few toy math and science problems laid out like a toy world (train split only)."""
    from branchmerge.toy.world import generate_split, problem_to_record

    for domain in ("math", "science"):
        probs = generate_split(domain, "train", 30, seed=0, knobs={}, seen=set())
        write_records(
            root / "data" / domain / "train.jsonl",
            [problem_to_record(p, domain, "train", i) for i, p in enumerate(probs)],
        )
    return root


def test_toy_teacher_generation_resumes_from_its_journal(tmp_path):
    toy = _tiny_toy_world(tmp_path / "toy_world")
    domains = {
        d: {
            "generate": True,
            "verifier": "toy",
            "sources": [{"format": "records", "path": str(toy / "data" / d / "train.jsonl")}],
        }
        for d in ("math", "science")
    }
    over = [
        f"paths.toy_dir={toy}",
        "teacher.n=3",
        "teacher.seed=1",
        "teacher.corrupt={wrong_answer: 0.2, unclosed_think: 0.1}",
        "selection.decontam.sets=[]",
    ]
    first = run(distill_cfg(tmp_path, domains, over))["stats"]
    for d in ("math", "science"):
        s = first[d]
        assert s["seeds"]["input"] == 30 and s["traces"]["input"] == 3 * s["seeds"]["kept"]
        assert s["traces"]["removed"]["verify"] > 0 and s["traces"]["removed"]["format"] > 0
        assert s["traces"]["removed"]["duplicate"] > 0  # the oracle repeats itself
        for stage in ("seeds", "traces"):
            assert s[stage]["input"] == sum(s[stage]["removed"].values()) + s[stage]["kept"]
    journal = tmp_path / "out" / "math" / "teacher" / "generations.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 30 and "_settings" in lines[0]
    with journal.open("a") as f:  # a torn write from a killed job
        f.write('{"key": "toy-math-train-0000')
    again = run(distill_cfg(tmp_path, domains, over))["stats"]
    assert again == first and journal.read_text().splitlines() == lines  # nothing re-sent
    other = [*over[:-3], "teacher.n=2", *over[-2:]]
    with pytest.raises(ValueError, match="other teacher settings"):
        run(distill_cfg(tmp_path, domains, other))


def test_failed_requests_are_counted_with_on_error_skip_and_retried_on_rerun(tmp_path, monkeypatch):
    from branchmerge.distill import teachers
    from branchmerge.distill.teachers.local import ToyTeacher

    toy = _tiny_toy_world(tmp_path / "toy_world")
    domains = {
        "math": {
            "generate": True,
            "verifier": "toy",
            "sources": [{"format": "records", "path": str(toy / "data" / "math" / "train.jsonl")}],
        }
    }
    over = [f"paths.toy_dir={toy}", "teacher.n=2", "teacher.on_error=skip", "selection.decontam.sets=[]"]
    sent: list[str] = []

    class Flaky:  # every third request fails after its retries
        def run(self, requests, on_done):
            oracle = ToyTeacher(OmegaConf.create({"corrupt": {}, "seed": 0}), toy_dir=str(toy))
            failed = [r.key for i, r in enumerate(requests) if i % 3 == 0]
            sent.extend(r.key for r in requests)
            oracle.run([r for r in requests if r.key not in failed], on_done)
            return failed

    monkeypatch.setattr(teachers, "build_teacher", lambda cfg, **kw: Flaky())
    s = run(distill_cfg(tmp_path, domains, over))["stats"]["math"]["traces"]
    assert s["removed"]["teacher_error"] == 2 * 10  # 10 of 30 requests, n=2 samples each
    assert s["input"] == 60 == sum(s["removed"].values()) + s["kept"]
    sent.clear()
    s = run(distill_cfg(tmp_path, domains, over))["stats"]["math"]["traces"]
    assert len(sent) == 10 and s["removed"]["teacher_error"] == 2 * 4  # only the failed were re-sent


def test_science_data_experiment_on_fixtures_filters_seeds_before_paying(tmp_path, monkeypatch):
    """The paper's science recipe as configured (+experiment=science_data), with its three seed sources
    pointed at the fixtures and a stand-in teacher: GPQA questions never reach the teacher."""
    from branchmerge.distill import teachers
    from branchmerge.distill.teachers import GenResult

    asked: list[str] = []

    class Echo:
        def run(self, requests, on_done):
            for r in requests:
                asked.append(r.messages[-1]["content"])
                samples = [{"text": "<think>\nhm\n</think>\n\nAnswer.", "finish_reason": "stop"}] * r.n
                on_done(GenResult(r.key, r.seed_id, samples, {}, "echo"))
            return []

    monkeypatch.setattr(teachers, "build_teacher", lambda cfg, **kw: Echo())
    files = ["data_ablation_full59k.jsonl", "s1k.jsonl", "openthoughts_metadata.jsonl"]
    cfg = compose(
        "distill",
        [
            "+experiment=science_data",
            f"paths.root_dir={tmp_path}",
            f"student_tokenizer={TOY_BASE}",
            f"selection.decontam.eval_data_dir={EVAL}",
            *(f"domains.science.sources.{i}.path={FIX / f}" for i, f in enumerate(files)),
        ],
        run_dir=tmp_path / "run",
    )
    stats = run(cfg)["stats"]["science"]
    # 59K: 3 rows + 1 bad (crossword not selected); s1K: 3 (GPQA plant removed); OpenThoughts: 6 + 1 bad
    assert stats["seeds"]["input"] == 4 + 3 + 7
    assert stats["seeds"]["removed"]["bad_row"] == 2 and stats["seeds"]["removed"]["decontam"] == 1
    assert stats["seeds"]["removed"]["select"] == 1 + 5  # the crossword; the five OpenThoughts code rows
    assert stats["seeds"]["kept"] == len(asked) == 2 + 2 + 1 == stats["kept"]
    assert not any("SI unit of force" in q for q in asked)
    out = tmp_path / "data" / "branches" / "science" / "train.jsonl"
    assert {r.domain for r in read_records(out, require_response=True)} == {"science"}
