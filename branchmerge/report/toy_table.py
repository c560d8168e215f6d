"""The toy Table 2: every model on all three toy domains, with standard errors and compute cost."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
