"""`hydra.sweeper.n_jobs=N` on one machine: N copies of the same command, each a sweep worker
pinned to its share of the cores (CPU affinity + OMP/MKL threads, so torch uses only those) and of
the GPUs (CUDA_VISIBLE_DEVICES), all feeding one study.

    cores 0..15, 4 workers -> worker i gets cores i, i+4, i+8, i+12 and 4 threads
    GPUs 0..7, 4 workers   -> worker i gets GPUs 2i, 2i+1 (CUDA_VISIBLE_DEVICES)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

log = logging.getLogger(__name__)
N_JOBS = "hydra.sweeper.n_jobs="


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES if set, else the GPUs nvidia-smi lists (none without it)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def shares(items: list, n: int) -> list[list]:
    """`items` dealt to n workers: contiguous blocks when there are at least n, else round robin."""
    if not items:
        return [[] for _ in range(n)]
    if len(items) < n:
        return [[items[i % len(items)]] for i in range(n)]
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def worker_command(argv: list[str]) -> list[str]:
    """The command that started this process, as one worker (`hydra.sweeper.n_jobs=1`)."""
    return [sys.executable, *[a for a in argv[1:] if not a.startswith(N_JOBS)], f"{N_JOBS}1"]


def spawn(n_jobs: int) -> list[int]:
    """Run `n_jobs` pinned workers to the end; returns their exit codes (negative: killed by signal)."""
    cores = shares(sorted(os.sched_getaffinity(0)), n_jobs)
    gpus = shares(visible_gpus(), n_jobs)
    cmd = worker_command(list(sys.orig_argv))
    procs = []
    for i in range(n_jobs):
        env = {**os.environ, "BM_SWEEP_WORKER": str(i)}
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(len(cores[i]))
        if gpus[i]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i])
        log.info("worker %d: cores %s, GPUs %s", i, cores[i], gpus[i] or "-")
        procs.append(
            subprocess.Popen(cmd, env=env, preexec_fn=_pin(cores[i]))  # noqa: PLW1509 (affinity only)
        )
    return [p.wait() for p in procs]


def _pin(cores: list[int]):
    def pin() -> None:
        os.sched_setaffinity(0, cores)

    return pin
