"""Plots of a merge sweep and of merge methods side by side (matplotlib, files only).

    python -m branchmerge.report sweep outputs/sweeps/toy_ties_grid      # -> <sweep>/plots/*.png

- score_vs_<param>.png: pass@1 per domain (± stderr) against each swept coefficient, other
  parameters averaged over (one line per domain, plus the objective)
- pareto.png: every trial in each pair of domains, the Pareto front over all domains highlighted;
  for a multi-objective Optuna study the front is the study's own (`optuna_summary.json`, written by
  the sweep workers from `study.best_trials`), over its objectives
- fig2_merge_methods.png (plot_methods): merge methods compared on every domain, the paper's Figure 2
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from branchmerge.sweep.results import load_results


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point dominates (>= in every coordinate, > in one)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(q[k] >= p[k] for k in range(len(p))) and any(q[k] > p[k] for k in range(len(p)))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def swept_params(rows: list[dict]) -> list[str]:
    """Numeric parameters that take more than one value across the trials."""
    values = defaultdict(set)
    for r in rows:
        for k, v in r["params"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[k].add(v)
    return [k for k, vs in values.items() if len(vs) > 1]


def plot_sweep(sweep_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the sweep's plots; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = [r for r in load_results(sweep_dir / "results.jsonl") if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"{sweep_dir / 'results.jsonl'} has no successful trial to plot")
    out_dir = Path(out_dir or sweep_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(rows[0]["scores"])
    written = [_score_vs(rows, p, tasks, out_dir) for p in swept_params(rows)]
    study_front = optuna_front(sweep_dir)
    if study_front is not None:
        objectives = list(rows[0].get("objectives") or tasks)
        front = {i for i, r in enumerate(rows) if r["run_dir"] in study_front}
        written.append(_pareto(rows, objectives, out_dir / "pareto.png", front, "Optuna's Pareto front"))
    elif len(tasks) >= 2:
        pts = [tuple(r["scores"][t]["pass@1"] for t in tasks) for r in rows]
        front = set(pareto_front(pts))
        written.append(_pareto(rows, tasks, out_dir / "pareto.png", front, "Pareto front (all domains)"))
    return written


def optuna_front(sweep_dir: Path) -> set[str] | None:
    """The trial folders on a multi-objective study's Pareto front (optuna_summary.json), or None."""
    path = Path(sweep_dir) / "optuna_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if "pareto_front" not in summary:
        return None
    return {t["run_dir"] for t in summary["pareto_front"] if "run_dir" in t}


def _score_vs(rows: list[dict], param: str, tasks: list[str], out_dir: Path) -> Path:
    plt = _pyplot()
    groups: dict[float, list[dict]] = defaultdict(list)
    for r in rows:
        if param in r["params"]:
            groups[r["params"][param]].append(r)
    xs = sorted(groups)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for t in tasks:
        ys = [100 * sum(r["scores"][t]["pass@1"] for r in groups[x]) / len(groups[x]) for x in xs]
        es = [100 * sum(r["scores"][t]["stderr"] for r in groups[x]) / len(groups[x]) for x in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=t)
    obj = [100 * sum(r["objective"] for r in groups[x]) / len(groups[x]) for x in xs]
    ax.plot(xs, obj, "k--", marker="s", label=f"objective ({rows[0]['metric']})")
    ax.set_xlabel(param)
    ax.set_ylabel("pass@1 (%)")
    n_other = len(rows) / max(len(xs), 1)
    ax.set_title(
        f"score against {param}" + (f" (mean over {n_other:.0f} settings of the rest)" if n_other > 1 else "")
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"score_vs_{param}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto(rows: list[dict], tasks: list[str], path: Path, front: set[int], label: str) -> Path:
    plt = _pyplot()
    pts = [tuple(100 * r["scores"][t]["pass@1"] for t in tasks) for r in rows]
    pairs = [(a, b) for i, a in enumerate(range(len(tasks))) for b in range(i + 1, len(tasks))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        others = [p for i, p in enumerate(pts) if i not in front]
        best = [p for i, p in enumerate(pts) if i in front]
        ax.scatter([p[a] for p in others], [p[b] for p in others], c="0.6", s=18, label="trial")
        ax.scatter([p[a] for p in best], [p[b] for p in best], c="C3", s=36, label=label)
        ax.set_xlabel(f"{tasks[a]} pass@1 (%)")
        ax.set_ylabel(f"{tasks[b]} pass@1 (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{len(rows)} trials, {len(front)} on the Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_methods(scores: dict[str, dict[str, tuple[float, float]]], path: Path, title: str) -> Path:
    """Grouped bars: one group per method (row label), one bar per domain, ± stderr (Figure 2)."""
    plt = _pyplot()
    labels = list(scores)
    tasks = list(next(iter(scores.values())))
    width = 0.8 / len(tasks)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.2))
    for j, t in enumerate(tasks):
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(
            xs,
            [scores[m][t][0] for m in labels],
            width,
            yerr=[scores[m][t][1] for m in labels],
            capsize=2,
            label=t,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
