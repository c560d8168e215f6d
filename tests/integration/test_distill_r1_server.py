"""The `openai` teacher against our OpenAI-compatible server on loopback serving a pico model with an
R1-style template and vLLM's reasoning split (`--reasoning-field reasoning`, as current vLLM servers
answer with `--reasoning-parser deepseek_r1`), one request per sample (teacher.n_per_request=false)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge.distill.pipeline import run
from branchmerge.distill.teachers import request_seed
from tests.conftest import ROOT
from tests.integration.test_distill_openai_server import N_SAMPLES, N_SEEDS, job_cfg, seeds_file
from tests.r1_chat import pico_r1


def serve(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "branchmerge.distill.serve", "--model", str(model), "--port", "0"]
    cmd += ["--request-log", str(log), "--reasoning-field", "reasoning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, line.split()[-1]


def received(log: Path) -> list[tuple[str, int]]:
    """(request id, seed) of every request the server received, in order."""
    rows = [ln.split() for ln in log.read_text().splitlines() if ln.startswith("recv ")]
    return [(r[1], int(r[2].removeprefix("seed="))) for r in rows]


@pytest.mark.slow
def test_reasoning_field_and_one_seed_per_sample_over_http(tmp_path):
    """Bugs planted, one at a time: (1) the client reading only `reasoning_content` -> every stored
    text is empty (the reasoning is dropped); (2) seed + k per sample (as before) -> sample k of every
    question is sent with the same seed, so the seeds the server receives are not distinct."""
    pico_r1(tmp_path / "pico")
    seeds = seeds_file(tmp_path / "seeds.jsonl")
    log = tmp_path / "server.log"
    server, url = serve(tmp_path / "pico", log)
    extra = ("teacher.n_per_request=false", "teacher.seed=5")
    try:
        for name in ("run1", "run2"):  # two fresh jobs: the second must send identical requests
            run(job_cfg(tmp_path / name, seeds, url, extra=extra))
    finally:
        server.kill()
        server.wait()
    got = received(log)
    keys = [f"q{i:02d}#{k}" for i in range(N_SEEDS) for k in range(N_SAMPLES)]
    first, second = sorted(got[: len(keys)]), sorted(got[len(keys) :])
    assert len(got) == 2 * len(keys) and first == second  # deterministic across runs
    assert first == sorted((k, request_seed(5, k)) for k in keys) and len({s for _, s in first}) == len(keys)
    journal = tmp_path / "run1" / "out" / "toy" / "teacher" / "generations.jsonl"
    results = [json.loads(x) for x in journal.read_text().splitlines()[1:]]
    assert sorted(r["key"] for r in results) == keys
    for r in results:
        (sample,) = r["samples"]
        assert sample["seed"] == request_seed(5, r["key"])
        # rebuilt from the server's `reasoning` (+ `content` when the random model closed it itself)
        assert sample["text"].startswith("<think>\n") and "\n</think>\n\n" in sample["text"]
    reasoning = [r["samples"][0]["text"][len("<think>\n") :].partition("\n</think>")[0] for r in results]
    assert sum(bool(x.strip()) for x in reasoning) > len(results) // 2  # (a few drew only blanks)
