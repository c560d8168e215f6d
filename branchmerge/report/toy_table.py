"""The toy Table 2: every model on all three toy domains, with standard errors and compute cost,
and beside it the item-paired comparisons between its rows (paired.md / paired.csv)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from branchmerge.report.paired import (
    LEVEL,
    RESAMPLES,
    Interval,
    Paired,
    align,
    bootstrap_means,
    from_draws,
    load_item_scores,
    mean_from_draws,
    retention_from_draws,
    samples_file,
)

DOMAINS = [("toy_math", "math"), ("toy_code", "code"), ("toy_science", "science")]


def scores_of(path: Path) -> dict[str, tuple[float, float]]:
    tasks = json.loads(path.read_text())["tasks"]
    return {k: (100 * v["pass@1"], 100 * v["stderr"]) for k, v in tasks.items()}


def write_toy_table(results: dict[str, Path], cost_s: dict[str, float], out_dir: Path) -> str:
    """Markdown table (returned and written), CSV and a bar chart of the rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, path in results.items():
        s = scores_of(path)
        mean = sum(s[d][0] for d, _ in DOMAINS) / len(DOMAINS)
        rows.append((label, s, mean, cost_s.get(label)))
    head = "| model | " + " | ".join(n for _, n in DOMAINS) + " | mean | compute (CPU-s) |"
    lines = [head, "|" + "---|" * (len(DOMAINS) + 3)]
    for label, s, mean, cost in rows:
        cells = [f"{s[d][0]:.1f} ± {s[d][1]:.1f}" for d, _ in DOMAINS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.1f} | {_cost(cost)} |")
    md = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(md)
    with (out_dir / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["model", *[f"{n}{k}" for _, n in DOMAINS for k in ("", "_stderr")], "mean", "compute_cpu_s"]
        )
        for label, s, mean, cost in rows:
            w.writerow(
                [
                    label,
                    *[round(v, 2) for d, _ in DOMAINS for v in s[d]],
                    round(mean, 2),
                    "" if cost is None else round(cost, 1),
                ]
            )
    _plot(rows, out_dir / "table.png")
    return md


def _cost(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.2f}"


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(DOMAINS)
    for j, (d, name) in enumerate(DOMAINS):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[1][d][0] for r in rows], width, yerr=[r[1][d][1] for r in rows], label=name, capsize=2)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("pass@1 (%)")
    ax.set_title("Toy Branch-Merge: every model on every domain (± standard error)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class Entry:
    """One cell of the paired table: `a` against `b` on `column` (a domain or the mean)."""

    block: str
    a: str
    b: str
    column: str
    stat: Paired | Interval


def write_paired_table(
    results: dict[str, Path],
    out_dir: Path,
    *,
    base: str,
    experts: dict[str, str],
    mixture: str | None,
    merges: list[str],
    fig2: list[str],
    fig2_refs: list[str],
    headline: str | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> str:
    """paired.md (returned) and paired.csv: item-paired differences between the rows of the toy table.

    `results` maps a row label to its results.json (samples.jsonl beside it); `experts` maps a task
    (toy_math, ...) to its expert's label; `fig2` are the math + science merges, each compared with
    every label in `fig2_refs` (TIES, Arcee Fusion). Differences are in points (A − B), bold where the
    95% interval excludes 0; retention is (merge − base)/(expert − base) on each domain. With
    `headline` (a merge's label, the TinyR1 order), paired.md opens with the paper's pattern checked
    on this run (`checks_markdown`).
    """
    needed = [base, *experts.values(), *([mixture] if mixture else []), *merges, *fig2, *fig2_refs]
    missing = sorted({label for label in needed if label not in results})
    if missing:
        raise KeyError(f"paired table: no results for {missing}; rows with results: {sorted(results)}")
    scores = _Scores(results, list(dict.fromkeys(needed)), resamples, seed)
    entries = _paired_entries(scores, base, experts, mixture, merges, fig2, fig2_refs)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = _paired_markdown(entries, scores.level)
    if headline:
        md = checks_markdown(scores, base, experts, headline, fig2) + "\n" + md
    (out_dir / "paired.md").write_text(md)
    _paired_csv(entries, out_dir / "paired.csv")
    return md


class _Scores:
    """Every row's item scores per task in one item order, bootstrapped once per task: one index draw
    serves all rows, so every comparison on a task is paired through the same resamples."""

    def __init__(
        self, results: dict[str, Path], labels: list[str], resamples: int, seed: int, level: float = LEVEL
    ):
        self.level, self.row = level, {label: i for i, label in enumerate(labels)}
        src = {label: samples_file(results[label].parent) for label in labels}
        items = {label: load_item_scores(src[label]) for label in labels}
        absent = [
            f"{label!r} ({src[label]}): {t}" for label in labels for t in _TASKS if t not in items[label]
        ]
        if absent:
            raise KeyError(
                f"paired table: tasks missing from samples.jsonl: {'; '.join(absent)}; re-run eval=toy"
            )
        self.x: dict[str, torch.Tensor] = {}
        self.draws: dict[str, torch.Tensor] = {}
        ref = labels[0]
        for t, task in enumerate(_TASKS):
            cols = [
                align(
                    items[ref][task],
                    items[label][task],
                    task=task,
                    source_a=str(src[ref]),
                    source_b=str(src[label]),
                )[1]
                for label in labels
            ]
            self.x[task] = torch.tensor(cols, dtype=torch.float64)  # (rows, items)
            self.draws[task] = bootstrap_means(self.x[task], resamples, seed + t)  # (resamples, rows)

    def diff(self, a: str, b: str, task: str) -> Paired:
        i, j = self.row[a], self.row[b]
        x, d = self.x[task], self.draws[task]
        return from_draws(x[i].tolist(), x[j].tolist(), d[:, i], d[:, j], self.level)

    def diff_mean(self, a: str, b: str) -> Paired:
        i, j = self.row[a], self.row[b]
        per_task = [self.diff(a, b, t) for t in _TASKS]
        return mean_from_draws(
            per_task, [self.draws[t][:, i] - self.draws[t][:, j] for t in _TASKS], self.level
        )

    def retention(self, merge: str, base: str, expert: str, task: str) -> Interval:
        rows = [self.row[x] for x in (base, merge, expert)]
        means = tuple(self.x[task][rows].mean(1).tolist())
        return retention_from_draws(means, self.draws[task][:, rows], self.level)


_TASKS = [d for d, _ in DOMAINS]
_NAME = dict(DOMAINS)


def _paired_entries(s: _Scores, base, experts, mixture, merges, fig2, fig2_refs) -> list[Entry]:
    """Every comparison of the paired table, block by block."""
    out: list[Entry] = []

    def against(block: str, a: str, b: str, with_mean: bool = True) -> None:
        out.extend(Entry(block, a, b, _NAME[d], s.diff(a, b, d)) for d in _TASKS)
        if with_mean:
            out.append(Entry(block, a, b, "mean", s.diff_mean(a, b)))

    for m in merges:
        against(f"merge − {base}", m, base)
    for m in merges:
        out.extend(
            Entry("merge − the domain's expert", m, e, _NAME[d], s.diff(m, e, d)) for d, e in experts.items()
        )
    if mixture:
        for m in merges:
            against(f"merge − {mixture}", m, mixture)
    out.extend(
        Entry(f"expert − {base} (own domain)", e, base, _NAME[d], s.diff(e, base, d))
        for d, e in experts.items()
    )
    for ref in fig2_refs:
        for m in fig2:
            if m != ref:
                against(f"Figure 2: method − {ref}", m, ref, with_mean=False)
    for m in merges:
        out.extend(
            Entry("gain retention (merge − base)/(expert − base)", m, e, _NAME[d], s.retention(m, base, e, d))
            for d, e in experts.items()
        )
    return out


MIN_EXPERT_GAIN, MIN_RETENTION = 0.05, 0.70  # the paper's pattern, as the toy demo checks it


def checks_markdown(s: _Scores, base: str, experts: dict[str, str], merge: str, fig2: list[str]) -> str:
    """The paper's pattern, checked on this run with paired intervals: each expert gains >= 5 points on
    its own domain (interval above 0); `merge` keeps >= 70% of each expert's gain and its mean is at
    least the best expert's; which Figure-2 methods differ from each other (interval excluding 0)."""
    ok = {True: "yes", False: "**no**"}
    lines = ["### The paper's pattern on this run", "", "| check | measured | holds |", "|---|---|---|"]
    for task, e in experts.items():
        d = s.diff(e, base, task)
        good = d.delta >= MIN_EXPERT_GAIN and d.lo > 0
        lines.append(f"| {e} − base on {_NAME[task]} ≥ +5, interval above 0 | {_cell(d)} | {ok[good]} |")
    for task, e in experts.items():
        r = s.retention(merge, base, e, task)
        lines.append(
            f"| {merge}: retention on {_NAME[task]} ≥ 0.70 | {_cell(r)} | {ok[r.value >= MIN_RETENTION]} |"
        )
    means = {e: sum(float(s.x[t][s.row[e]].mean()) for t in _TASKS) / len(_TASKS) for e in experts.values()}
    best = max(means, key=means.get)
    d = s.diff_mean(merge, best)
    lines.append(f"| {merge} mean − best expert's mean ({best}) ≥ 0 | {_cell(d)} | {ok[d.delta >= 0]} |")
    pairs = [
        f"{a} vs {b} on {_NAME[t]} ({_cell(s.diff(a, b, t))})"
        for i, a in enumerate(fig2)
        for b in fig2[i + 1 :]
        for t in _TASKS
        if s.diff(a, b, t).excludes_zero
    ]
    lines.append(
        f"| Figure 2: pairs of methods that differ (interval excludes 0) | {len(pairs)} | {ok[bool(pairs)]} |"
    )
    if pairs:
        lines += ["", "Differing Figure-2 pairs: " + "; ".join(pairs) + "."]
    return "\n".join(lines) + "\n"


def _cell(stat: Paired | Interval) -> str:
    if isinstance(stat, Paired):
        text = f"{100 * stat.delta:+.1f} [{100 * stat.lo:+.1f}, {100 * stat.hi:+.1f}]"
    else:
        text = f"{stat.value:.2f} [{stat.lo:.2f}, {stat.hi:.2f}]"
    return f"**{text}**" if stat.excludes_zero else text


def _paired_markdown(entries: list[Entry], level: float) -> str:
    """One Markdown table per block: rows = model A, columns = domains (and the mean)."""
    lines = [
        f"Paired differences A − B in points over the same items, with {100 * level:.0f}% paired bootstrap "
        "intervals; **bold**: the interval excludes 0. McNemar p and discordant counts: paired.csv."
    ]
    for block in dict.fromkeys(e.block for e in entries):
        rows = [e for e in entries if e.block == block]
        cols = list(dict.fromkeys(e.column for e in rows))
        cells = {(e.a, e.column): _cell(e.stat) for e in rows}
        lines += [
            "",
            f"### {block}",
            "",
            "| model | " + " | ".join(cols) + " |",
            "|" + "---|" * (len(cols) + 1),
        ]
        for a in dict.fromkeys(e.a for e in rows):
            lines.append(f"| {a} | " + " | ".join(cells.get((a, c), "–") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _paired_csv(entries: list[Entry], path: Path) -> None:
    """Flat rows: differences in points (unit pts), retention as a ratio (unit ratio)."""
    head = ["block", "a", "b", "domain", "unit", "value", "ci_lo", "ci_hi", "excludes_zero"]
    head += ["n_items", "a_pct", "b_pct", "mcnemar_p", "a_only", "b_only"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for e in entries:
            st = e.stat
            if isinstance(st, Paired):
                vals = ["pts", *(round(100 * v, 3) for v in (st.delta, st.lo, st.hi)), st.excludes_zero]
                vals += [st.n, round(100 * st.mean_a, 3), round(100 * st.mean_b, 3)]
                vals += [
                    "" if st.p_mcnemar is None else f"{st.p_mcnemar:.10g}",
                    _blank(st.a_only),
                    _blank(st.b_only),
                ]
            else:
                vals = [
                    "ratio",
                    *(round(v, 4) for v in (st.value, st.lo, st.hi)),
                    st.excludes_zero,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            w.writerow([e.block, e.a, e.b, e.column, *vals])


def _blank(v: int | None) -> object:
    return "" if v is None else v
