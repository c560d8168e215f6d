"""Paired comparisons of models scored on the same items: differences, intervals, exact tests.

    python -m branchmerge.report paired outputs/eval/toy_merge_ties_toy outputs/eval/toy_base_toy

Every model is evaluated on the same questions, so two models are compared item by item. With
p_d = mean_k v_dk the score of item d (mean verdict over its n samples) and a_d, b_d the scores of
models A and B on the same N items:

    Δ = mean_d (a_d − b_d)
    paired bootstrap   Δ*_r = mean_j (a − b)_{I_rj},  I_rj ~ uniform{1..N} iid,  r = 1..R
                       95% interval = [q_2.5(Δ*), q_97.5(Δ*)]   (percentile interval)
    McNemar (binary)   B = #{d: a_d=1, b_d=0},  C = #{d: a_d=0, b_d=1},  m = B + C
                       p = min(1, 2 Σ_{i ≤ min(B,C)} C(m, i) / 2^m)   (exact two-sided binomial)
    gain retention     ρ = (mean m_d − mean b_d) / (mean e_d − mean b_d)   (merge m, base b, expert e)

One index draw I_r serves every model of a comparison; that is what makes the interval paired (the
item difficulty shared by both models cancels). Scores are fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """A − B on n shared items; a_only/b_only/p_mcnemar are None unless every item score is 0 or 1."""

    n: int
    mean_a: float
    mean_b: float
    delta: float
    lo: float
    hi: float
    a_only: int | None = None
    b_only: int | None = None
    p_mcnemar: float | None = None

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def samples_file(path: str | Path) -> Path:
    """An eval folder (holding samples.jsonl) or the samples.jsonl file itself."""
    p = Path(path)
    f = p / "samples.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no samples.jsonl; pass a folder written by `python evaluate.py`")
    return f


def load_item_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """samples.jsonl of an eval folder -> {task: {question id: p_d}}, p_d = mean verdict of item d."""
    f = samples_file(path)
    verdicts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with f.open() as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("task", "question", "verdict") if k not in row]
            if missing:
                raise ValueError(f"{f}:{i}: row lacks {missing}; re-run evaluate.py to rewrite samples.jsonl")
            verdicts[row["task"]][str(row["question"])].append(float(row["verdict"]))
    return {t: {q: sum(v) / len(v) for q, v in qs.items()} for t, qs in verdicts.items()}


def align(
    a: dict[str, float], b: dict[str, float], *, task: str, source_a: str, source_b: str
) -> tuple[list[float], list[float]]:
    """Two {question: p_d} maps -> score lists in one item order; refuses differing item sets."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        where = (
            f"{only_a[0]!r} is in {source_a} but not in {source_b}"
            if only_a
            else f"{only_b[0]!r} is in {source_b} but not in {source_a}"
        )
        raise ValueError(
            f"task {task}: item sets differ ({len(only_a)} only in A, {len(only_b)} only in B): {where}; "
            "evaluate both models on the same suite, split and limit"
        )
    ids = sorted(a)
    return [a[q] for q in ids], [b[q] for q in ids]


def bootstrap_means(
    x: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0, chunk: int = 1000
) -> torch.Tensor:
    """x: (k, N) item scores of k models -> (resamples, k) means over N items drawn with replacement.

    The same index draw I_r (N,) serves all k rows (paired): with W_rd = #{j: I_rj = d} the
    resample counts, means = W x^T / N, (R, N) @ (N, k), computed `chunk` resamples at a time.
    A given (seed, N) gives the same draws whatever k is, so rows bootstrapped apart stay paired.
    """
    g = torch.Generator().manual_seed(seed)
    x = x.to(torch.float64)
    n = x.shape[1]
    out = []
    for start in range(0, resamples, chunk):
        idx = torch.randint(n, (min(chunk, resamples - start), n), generator=g)
        counts = torch.zeros(idx.shape, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64)
        )
        out.append(counts @ x.T / n)
    return torch.cat(out)


def percentile(draws: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The (1−level)/2 and (1+level)/2 quantiles of (R,) draws, ignoring NaN draws (NaN if all are)."""
    if torch.isnan(draws).all():
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype)
    lo, hi = torch.nanquantile(draws, q).tolist()
    return lo, hi


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p: 2 P(X ≤ min(B, C)), X ~ Bin(B + C, ½), capped at 1 (1 if B = C = 0)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**m)


def discordant(a: list[float], b: list[float]) -> tuple[int, int] | None:
    """(B, C) = (#a=1,b=0, #a=0,b=1) when every score is 0 or 1, else None (no McNemar)."""
    if any(v not in (0.0, 1.0) for v in (*a, *b)):
        return None
    return sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))


def _check_pair(a: list[float], b: list[float]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(
            f"a paired difference needs two equally long non-empty score lists, got {len(a)}, {len(b)}"
        )


def from_draws(
    a: list[float], b: list[float], da: torch.Tensor, db: torch.Tensor, level: float = LEVEL
) -> Paired:
    """Paired A − B from item scores a, b (N,) and their bootstrap means da, db (R,) of one index draw."""
    _check_pair(a, b)
    lo, hi = percentile(da - db, level)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    disc = discordant(a, b)
    extra = {} if disc is None else {"a_only": disc[0], "b_only": disc[1], "p_mcnemar": mcnemar_exact(*disc)}
    return Paired(len(a), ma, mb, ma - mb, lo, hi, **extra)


def paired_diff(
    a: list[float], b: list[float], *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Paired:
    """Δ = mean(a − b) with its paired bootstrap interval and, for binary scores, exact McNemar."""
    _check_pair(a, b)
    draws = bootstrap_means(torch.tensor([a, b]), resamples, seed)
    return from_draws(a, b, draws[:, 0], draws[:, 1], level)


def mean_from_draws(per_task: list[Paired], diff_draws: list[torch.Tensor], level: float = LEVEL) -> Paired:
    """Δ of the unweighted mean over tasks, (1/T) Σ_t Δ_t, from each task's own (R,) difference draws
    (stratified: items are resampled within their task). No McNemar: the tasks' items are not one
    exchangeable set."""
    t = len(per_task)
    lo, hi = percentile(torch.stack(diff_draws).mean(0), level)
    ma, mb = sum(p.mean_a for p in per_task) / t, sum(p.mean_b for p in per_task) / t
    return Paired(sum(p.n for p in per_task), ma, mb, ma - mb, lo, hi)


def paired_diff_mean(
    pairs: list[tuple[list[float], list[float]]],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Paired:
    """Δ of the unweighted mean over tasks; task t is bootstrapped with seed + t."""
    per_task, diffs = [], []
    for t, (a, b) in enumerate(pairs):
        draws = bootstrap_means(torch.tensor([a, b]), resamples, seed + t)
        per_task.append(from_draws(a, b, draws[:, 0], draws[:, 1], level))
        diffs.append(draws[:, 0] - draws[:, 1])
    return mean_from_draws(per_task, diffs, level)


def retention_from_draws(
    means: tuple[float, float, float], draws: torch.Tensor, level: float = LEVEL
) -> Interval:
    """ρ = (M − B)/(E − B) from the means (B, M, E) and their (R, 3) bootstrap draws of one index draw.

    Resamples whose expert gain is 0 are undefined and dropped; ρ is NaN when the expert gain is 0.
    """
    b, m, e = means
    gain = draws[:, 2] - draws[:, 0]
    ratio = torch.where(gain != 0, (draws[:, 1] - draws[:, 0]) / gain, torch.nan)
    value = (m - b) / (e - b) if e != b else math.nan
    return Interval(value, *percentile(ratio, level))


def retention(
    base: list[float],
    merge: list[float],
    expert: list[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Gain retention ρ = (M − B)/(E − B) of means over the same items, one index draw for all three.

    1 = the merge keeps the expert's whole gain over the base, 0 = none of it.
    """
    if not len(base) == len(merge) == len(expert) > 0:
        raise ValueError(f"retention needs equally long lists, got {len(base)}, {len(merge)}, {len(expert)}")
    draws = bootstrap_means(torch.tensor([base, merge, expert]), resamples, seed)
    means = tuple(sum(x) / len(x) for x in (base, merge, expert))
    return retention_from_draws(means, draws, level)


def compare_dirs(
    dir_a: str | Path,
    dir_b: str | Path,
    tasks: list[str] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Paired]:
    """Per-task A − B for two eval folders (default: every task of A, which B must also have)."""
    fa, fb = samples_file(dir_a), samples_file(dir_b)
    sa, sb = load_item_scores(fa), load_item_scores(fb)
    tasks = tasks or sorted(sa)
    for f, s in ((fa, sa), (fb, sb)):
        absent = [t for t in tasks if t not in s]
        if absent:
            raise ValueError(
                f"{f}: no samples of task(s) {absent} (has {sorted(s)}); evaluate it on them first"
            )
    out = {}
    for t in tasks:
        a, b = align(sa[t], sb[t], task=t, source_a=str(fa), source_b=str(fb))
        out[t] = paired_diff(a, b, resamples=resamples, seed=seed, level=level)
    return out


def format_line(task: str, p: Paired, level: float = LEVEL) -> str:
    """One line: Δ in points, its interval (* when it excludes 0), McNemar p and discordant counts."""
    mark = " *" if p.excludes_zero else "  "
    line = (
        f"{task}: Δ = {100 * p.delta:+.1f} pts, {100 * level:.0f}% CI [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}]{mark}"
        f"  (A {100 * p.mean_a:.1f}% vs B {100 * p.mean_b:.1f}%, {p.n} items)"
    )
    if p.p_mcnemar is not None:
        line += f"  McNemar p = {p.p_mcnemar:.3g}, A only right {p.a_only}, B only right {p.b_only}"
    return line
