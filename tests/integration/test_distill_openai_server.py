"""The `openai` teacher against a real OpenAI-compatible server on loopback (branchmerge.distill.serve
serving a pico model), killed with SIGKILL mid-run: resuming gives every record exactly once and never
re-sends a finished request (the server's request log proves it). Also the `hf` and `vllm` backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from branchmerge.data.records import Record, read_records, write_records
from branchmerge.distill.pipeline import run
from branchmerge.distill.teachers import TeacherError
from tests.conftest import ROOT, TOY_BASE, compose, load_model_entry

N_SEEDS, N_SAMPLES = 12, 2


@pytest.fixture(scope="module")
def pico_dir(tmp_path_factory) -> Path:
    """A pico Qwen2 (2 layers, hidden 32) with the toy tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoTokenizer

    from branchmerge.models import build_model

    root = tmp_path_factory.mktemp("pico")
    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    tok.save_pretrained(root / "toy" / "tokenizer")
    out = root / "pico"
    build_model(load_model_entry("pico", root / "toy"), tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def start_server(model: Path, log: Path, delay_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "branchmerge.distill.serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--request-log",
        str(log),
        "--delay-s",
        str(delay_s),
    ]
    err = log.with_suffix(".stderr")
    with err.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    line = proc.stdout.readline()  # blocks until the model is loaded and the socket listens
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{err.read_text()[-2000:]}")
    return proc, line.split()[-1]


def seeds_file(path: Path) -> Path:
    recs = [
        Record(f"q{i:02d}", "toy", "test", [{"role": "user", "content": f"Count to {i}."}], "")
        for i in range(N_SEEDS)
    ]
    write_records(path, recs)
    return path


def job_cfg(tmp_path: Path, seeds: Path, url: str, teacher: str = "openai", extra: tuple[str, ...] = ()):
    cfg = compose(
        "distill",
        [
            f"teacher={teacher}",
            f"paths.root_dir={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
            f"teacher.n={N_SAMPLES}",
            "teacher.max_new_tokens=6",
            "teacher.seed=0",
            "selection.format=false",
            "selection.max_tokens=null",
            "selection.dedup=false",
            "selection.decontam.sets=[]",
            *extra,
        ],
        run_dir=tmp_path / "run",
    )
    with open_dict(cfg):
        if teacher == "openai":
            cfg.teacher.base_url, cfg.teacher.model = url, "pico"
        cfg.domains = OmegaConf.create(
            {
                "toy": {
                    "generate": True,
                    "verifier": "none",
                    "sources": [{"format": "records", "path": str(seeds)}],
                }
            }
        )
    return cfg


def requests_in(log: Path, what: str) -> list[str]:
    return (
        [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith(what)] if log.exists() else []
    )


@pytest.mark.slow
def test_server_killed_mid_run_then_resumed_gives_every_record_once(tmp_path, pico_dir):
    seeds = seeds_file(tmp_path / "seeds.jsonl")
    journal = tmp_path / "out" / "toy" / "teacher" / "generations.jsonl"
    fast_fail = (
        "teacher.concurrency=2",
        "teacher.max_retries=2",
        "teacher.backoff_s=0.05",
        "teacher.timeout_s=30",
    )
    log1, log2 = tmp_path / "server1.log", tmp_path / "server2.log"
    server, url = start_server(pico_dir, log1, delay_s=0.3)
    errors: list[BaseException] = []

    def job():
        try:
            run(job_cfg(tmp_path, seeds, url, extra=fast_fail))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    worker = threading.Thread(target=job)
    worker.start()
    deadline = time.time() + 120
    while (
        time.time() < deadline and len(journal.read_text().splitlines() if journal.exists() else []) < 1 + 4
    ):
        time.sleep(0.02)
    server.send_signal(signal.SIGKILL)  # mid-run: requests in flight and queued
    server.wait()
    worker.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], TeacherError), errors
    finished1 = [json.loads(x)["key"] for x in journal.read_text().splitlines()[1:]]
    assert 4 <= len(finished1) < N_SEEDS and set(finished1) <= set(requests_in(log1, "done"))

    server2, url2 = start_server(pico_dir, log2)
    try:
        manifest = run(job_cfg(tmp_path, seeds, url2, extra=fast_fail))
    finally:
        server2.kill()
        server2.wait()
    sent2 = requests_in(log2, "recv")
    assert not set(sent2) & set(finished1)  # a finished request is never sent again
    assert sorted(sent2) == sorted(set(f"q{i:02d}" for i in range(N_SEEDS)) - set(finished1))  # each once
    keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()[1:]]
    assert sorted(keys) == [f"q{i:02d}" for i in range(N_SEEDS)]  # every request journalled exactly once
    recs = list(read_records(tmp_path / "out" / "toy" / "train.jsonl", require_response=True))
    assert sorted(r.id for r in recs) == sorted(
        f"q{i:02d}-s{k}" for i in range(N_SEEDS) for k in range(N_SAMPLES)
    )
    stats = manifest["stats"]["toy"]["traces"]
    assert stats == {
        "input": N_SEEDS * N_SAMPLES,
        "removed": {"teacher_error": 0, "length": 0, "verify": 0},
        "kept": N_SEEDS * N_SAMPLES,
    }
    print(
        f"\nkilled after {len(finished1)}/{N_SEEDS} finished; server 1 received {len(requests_in(log1, 'recv'))}, "
        f"server 2 received {len(sent2)}; {len(recs)} records"
    )


@pytest.mark.slow
def test_hf_teacher_generates_n_samples_in_process(tmp_path, pico_dir):
    seeds = seeds_file(tmp_path / "seeds.jsonl")
    manifest = run(job_cfg(tmp_path, seeds, "", teacher="hf", extra=(f"teacher.model={pico_dir}",)))
    assert manifest["stats"]["toy"]["traces"]["kept"] == N_SEEDS * N_SAMPLES
    rec = next(read_records(tmp_path / "out" / "toy" / "train.jsonl"))
    assert rec.metadata["finish_reason"] in ("stop", "length") and rec.metadata["seed_id"] == "q00"


@pytest.mark.gpu
def test_vllm_teacher_on_gpu(tmp_path, pico_dir):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    seeds = seeds_file(tmp_path / "seeds.jsonl")
    extra = (f"teacher.model={pico_dir}", "teacher.tensor_parallel_size=1", "teacher.dtype=float32")
    manifest = run(job_cfg(tmp_path, seeds, "", teacher="vllm", extra=extra))
    assert manifest["stats"]["toy"]["traces"]["kept"] == N_SEEDS * N_SAMPLES
