"""The study's grid: which training runs ("groups"), in which order, and the jobs each one needs.

    group = (base, lr, seed): ONE run per domain (math, code, science; + the mixture where asked) of
            max(steps) steps (the mixture: 3 x), exported at every step count in `steps`
    cell  = (base, lr, steps, seed): the 3 experts at that step count, their merges
            (tinyr1 / linear / ties, same knobs everywhere), the mixture at 3 x steps

Every job's output folder is a pure function of its key, so the runner finds finished work on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

DOMAINS = ("math", "code", "science")
METHODS = ("tinyr1", "linear", "ties")
MIXTURE_FACTOR = 3  # the mixture trains on all three domains for the sum of the branches' steps


def lr_tag(lr: float) -> str:
    return f"lr{lr:.0e}"


@dataclass(frozen=True)
class Group:
    base: str
    lr: float
    seed: int
    mixture: bool = False

    @property
    def tag(self) -> str:
        return f"{lr_tag(self.lr)}_s{self.seed}"


@dataclass(frozen=True)
class Job:
    """One process-sized piece of work. `kind`: train | merge | eval; `deps`: job keys it needs."""

    key: str
    kind: str
    group: Group | None
    deps: tuple[str, ...] = ()
    spec: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Layout:
    out: Path
    steps: tuple[int, ...]

    @property
    def every(self) -> int:
        return reduce(math.gcd, self.steps)

    def train_dir(self, g: Group, domain: str) -> Path:
        return self.out / "train" / g.base / g.tag / domain

    def model(self, g: Group, domain: str, step: int) -> Path:
        """An expert (or the mixture, step = its own 3 x step) at `step`: the final export or a snapshot."""
        total = max(self.steps) * (MIXTURE_FACTOR if domain == "mixture" else 1)
        if step == total:
            return self.train_dir(g, domain) / "export"
        return self.out / "models" / g.base / g.tag / domain / f"step{step}"

    def merge_dir(self, g: Group, step: int, method: str) -> Path:
        return self.out / "merges" / g.base / g.tag / f"step{step}" / method

    def eval_dir(self, key: str) -> Path:
        return self.out / "evals" / key


def group_jobs(g: Group, lay: Layout, methods: tuple[str, ...], expert_domains: str) -> list[Job]:
    """Every job of one group, in the order the runner prefers: trainings, merges, evaluations."""
    jobs: list[Job] = []
    runs = [*DOMAINS, *(["mixture"] if g.mixture else [])]
    for d in runs:
        f = MIXTURE_FACTOR if d == "mixture" else 1
        jobs.append(
            Job(
                f"train/{g.base}/{g.tag}/{d}",
                "train",
                g,
                spec={"domain": d, "total": max(lay.steps) * f, "steps": [s * f for s in lay.steps]},
            )
        )
    trains = tuple(f"train/{g.base}/{g.tag}/{d}" for d in DOMAINS)
    for s in lay.steps:
        for m in methods:
            jobs.append(
                Job(f"merge/{g.base}/{g.tag}/step{s}/{m}", "merge", g, trains, {"step": s, "method": m})
            )
    for s in lay.steps:
        cell = f"{g.base}/{g.tag}/step{s}"
        for d in DOMAINS:
            doms = [d] if expert_domains == "own" else list(DOMAINS)
            jobs.append(
                Job(
                    f"eval/{cell}/{d}_expert",
                    "eval",
                    g,
                    (f"train/{g.base}/{g.tag}/{d}",),
                    {"model": str(lay.model(g, d, s)), "domains": doms},
                )
            )
        for m in methods:
            jobs.append(
                Job(
                    f"eval/{cell}/{m}",
                    "eval",
                    g,
                    (f"merge/{cell}/{m}",),
                    {"model": str(lay.merge_dir(g, s, m) / "model"), "domains": list(DOMAINS)},
                )
            )
        if g.mixture:
            jobs.append(
                Job(
                    f"eval/{cell}/mixture",
                    "eval",
                    g,
                    (f"train/{g.base}/{g.tag}/mixture",),
                    {"model": str(lay.model(g, "mixture", s * MIXTURE_FACTOR)), "domains": list(DOMAINS)},
                )
            )
    return jobs


def base_job(base: str, path: Path) -> Job:
    return Job(f"eval/{base}/base", "eval", None, (), {"model": str(path), "domains": list(DOMAINS)})


# ---- cost model ----------------------------------------------------------------------------------
# Seconds on one thread of the 2-core machine with the other core busy, measured on the toy base
# (1.9 M params, batch 16 x 512): a train step, a process start, an item scored (greedy, <= 320 tokens).
DEFAULT_COST = {"step": 2.4, "start_train": 15.0, "start_eval": 10.0, "merge": 6.0}
ITEM_COST = {"math": 0.045, "code": 0.13, "science": 0.03}


def job_cost(job: Job, limit: int, scale: dict[str, float]) -> float:
    """Estimated seconds of `job`, times the measured/default ratio of its kind (`scale`)."""
    if job.kind == "train":
        est = DEFAULT_COST["start_train"] + DEFAULT_COST["step"] * job.spec["total"]
    elif job.kind == "merge":
        est = DEFAULT_COST["merge"]
    else:
        est = DEFAULT_COST["start_eval"] + sum(ITEM_COST[d] * limit for d in job.spec["domains"])
    return est * scale.get(job.kind, 1.0)
