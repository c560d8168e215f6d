"""`python distill.py +experiment=toy_distill` end to end on the session's toy world: the toy oracle
writes n samples per train question (some damaged on purpose), every filter counts, counts add up, the
kept traces all pass the toy verifiers and none is a toy test question."""

from __future__ import annotations

import json

import pytest

from branchmerge.data.records import read_records
from branchmerge.distill.pipeline import run
from branchmerge.toy import get_domain
from tests.conftest import compose


@pytest.mark.slow
def test_toy_distill_experiment(tmp_path, toy_world):
    over = [
        "+experiment=toy_distill",
        f"paths.root_dir={tmp_path}",
        f"paths.toy_dir={toy_world}",
        "domains.math.sources.0.limit=60",
        "domains.code.sources.0.limit=30",
        "domains.science.sources.0.limit=60",
    ]
    manifest = run(compose("distill", over, run_dir=tmp_path / "run"))
    out = tmp_path / "outputs" / "toy_distill"
    assert json.loads((out / "manifest.json").read_text())["stats"] == manifest["stats"]
    tests = {
        d: {r.prompt for r in read_records(toy_world / "data" / d / "test.jsonl")} for d in manifest["stats"]
    }
    for domain, s in manifest["stats"].items():
        for stage in ("seeds", "traces"):
            assert s[stage]["input"] == sum(s[stage]["removed"].values()) + s[stage]["kept"]
        assert s["traces"]["input"] == 2 * s["seeds"]["kept"]  # teacher.n = 2
        assert s["traces"]["removed"]["duplicate"] > 0  # the oracle's two samples often agree
        kept = list(read_records(out / domain / "train.jsonl", require_response=True))
        assert len(kept) == s["kept"] > 0
        dom = get_domain(domain)
        assert all(dom.verify(r.response, r.reference, r.metadata) for r in kept)
        assert not {r.prompt for r in kept} & tests[domain]
    bad = sum(
        s["traces"]["removed"]["verify"] + s["traces"]["removed"]["format"]
        for s in manifest["stats"].values()
    )
    assert bad > 0  # the damaged samples were caught
