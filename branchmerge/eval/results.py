"""Statistics of a task's per-sample verdicts.

With v_dk the verdict of sample k on question d (N questions, n samples each):
    pass@1  = mean_d p_d,   p_d = mean_k v_dk
    stderr  = std_d(p_d) / sqrt(N)                (uncertainty from the finite question set)
    spread  = std_k(a_k),   a_k = mean_d v_dk     (how much one run of n=1 moves with the seed)
"""

from __future__ import annotations

import math
from collections import defaultdict


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize_task(rows: list[dict], max_gen_toks: int) -> dict:
    by_q: dict[str, list[int]] = defaultdict(list)
    by_k: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        by_q[r["question"]].append(r["verdict"])
        by_k[r["sample"]].append(r["verdict"])
    p = [sum(v) / len(v) for v in by_q.values()]
    n_q = len(p)
    a = [sum(v) / len(v) for _, v in sorted(by_k.items())]
    tokens = [r.get("n_tokens", 0) for r in rows]
    return {
        "pass@1": sum(p) / max(1, n_q),
        "stderr": _std(p) / math.sqrt(n_q) if n_q else 0.0,
        "seed_spread": _std(a),
        "per_sample_index": a,
        "questions": n_q,
        "generations": len(rows),
        "mean_gen_tokens": sum(tokens) / max(1, len(tokens)),
        "cap_hit_fraction": sum(t >= max_gen_toks for t in tokens) / max(1, len(tokens)),
    }
