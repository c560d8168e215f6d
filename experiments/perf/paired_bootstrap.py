"""Paired bootstrap speed: 10k resamples of 1000 items, our counts-matmul vs an index gather vs pure Python.

    PYTHONPATH=$PWD python experiments/perf/paired_bootstrap.py

Two models' binary item scores (1000 items), 10,000 resamples, one CPU thread. Ours
(branchmerge.report.paired.bootstrap_means): resample counts W (R, N) by scatter-add, means = W x^T / N.
The gather variant indexes x[:, I] (k, R, N) and averages; the pure-Python one loops over resamples
with random.choices. Minimum wall time over the repeats; prints seconds and ratios side by side and
writes experiments/perf/results/paired_bootstrap.json.
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import torch

from branchmerge.report.paired import bootstrap_means

RESULTS = Path(__file__).resolve().parent / "results"
N, R, REPEATS = 1000, 10_000, 3


def gather(x: torch.Tensor, resamples: int, seed: int, chunk: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, resamples, chunk):
        idx = torch.randint(x.shape[1], (min(chunk, resamples - start), x.shape[1]), generator=g)
        out.append(x[:, idx].mean(-1).T)
    return torch.cat(out)


def pure_python(a: list[float], b: list[float], resamples: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    d, n = [x - y for x, y in zip(a, b)], len(a)
    return [sum(rng.choices(d, k=n)) / n for _ in range(resamples)]


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    rng = random.Random(0)
    a = [float(rng.random() < 0.5) for _ in range(N)]
    b = [float(rng.random() < 0.45) for _ in range(N)]
    x = torch.tensor([a, b], dtype=torch.float64)
    ours, via_gather = bootstrap_means(x, R, 0), gather(x, R, 0)
    assert torch.allclose(ours, via_gather), "the two torch variants must give the same draws"
    t = {
        "ours (counts @ x^T)": best(lambda: bootstrap_means(x, R, 0)),
        "torch gather": best(lambda: gather(x, R, 0)),
        "pure python": best(lambda: pure_python(a, b, R, 0)),
    }
    print(f"{R} paired resamples of {N} items, 1 thread, min of {REPEATS}:")
    for name, s in t.items():
        print(f"  {name:22s} {s:8.3f} s   {s / t['ours (counts @ x^T)']:6.1f}x ours")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"items": N, "resamples": R, "seconds": t, "machine": platform.processor() or platform.machine()}
    (RESULTS / "paired_bootstrap.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
