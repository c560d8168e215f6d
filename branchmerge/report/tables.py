"""Build the paper's tables with our numbers beside its own, as Markdown, LaTeX and CSV.

A table has rows (models) and benchmark columns. The paper's numbers come from a CSV kept as data
under experiments/ (one row per model, empty cells for what the paper did not report); ours come
from `evaluate.py` result files (pass@1 and its standard error, in percent). Rows of ours that the
paper does not have are appended, and cells the paper left empty are filled where we measured them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS = {
    "aime24": "AIME24",
    "livecodebench": "LCB 24.08-25.02",
    "gpqa_diamond": "GPQA-D",
    "toy_math": "toy math",
    "toy_code": "toy code",
    "toy_science": "toy science",
}


@dataclass
class Row:
    model: str
    paper: dict[str, float | None] = field(default_factory=dict)
    ours: dict[str, tuple[float, float]] = field(default_factory=dict)  # benchmark -> (score %, stderr %)
    extra: dict[str, str] = field(default_factory=dict)  # other paper columns (GPU-h, notes)


def read_paper(path: str | Path) -> tuple[list[Row], list[str], list[str]]:
    """Rows, benchmark columns and other columns of a paper CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        bench = [c for c in cols if c in BENCHMARKS]
        other = [c for c in cols if c not in bench and c != "model"]
        rows = [
            Row(r["model"], {b: (float(r[b]) if r[b] else None) for b in bench}, {}, {o: r[o] for o in other})
            for r in reader
        ]
    return rows, bench, other


def read_result(path: str | Path) -> dict[str, tuple[float, float]]:
    tasks = json.loads(Path(path).read_text())["tasks"]
    return {name: (100 * t["pass@1"], 100 * t["stderr"]) for name, t in tasks.items()}


def build(paper_csv: str | Path | None, results: dict[str, str | Path], benchmarks: list[str] | None = None):
    rows, bench, other = read_paper(paper_csv) if paper_csv else ([], [], [])
    by_name = {r.model: r for r in rows}
    for model, path in results.items():
        row = by_name.get(model)
        if row is None:
            row = Row(model)
            rows.append(row)
            by_name[model] = row
        row.ours = read_result(path)
        bench += [b for b in row.ours if b not in bench]
    if benchmarks:
        bench = benchmarks
    return rows, bench, other


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _ours(row: Row, b: str) -> str:
    if b not in row.ours:
        return "–"
    s, se = row.ours[b]
    return f"{s:.1f} ± {se:.1f}"


def to_markdown(rows: list[Row], bench: list[str], other: list[str], with_ours: bool = True) -> str:
    head = ["model"]
    for b in bench:
        head += [f"{BENCHMARKS[b]} (paper)"] + ([f"{BENCHMARKS[b]} (ours)"] if with_ours else [])
    head += other
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model]
        for b in bench:
            cells += [_fmt(r.paper.get(b))] + ([_ours(r, b)] if with_ours else [])
        cells += [r.extra.get(o, "") or "–" for o in other]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(rows: list[Row], bench: list[str], other: list[str]) -> str:
    cols = "l" + "cc" * len(bench) + "c" * len(other)
    head = ["Model"] + [f"{BENCHMARKS[b]} (paper) & {BENCHMARKS[b]} (ours)" for b in bench] + other
    out = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
    for r in rows:
        cells = [r.model.replace("&", "\\&")]
        cells += [_fmt(r.paper.get(b)) + " & " + _ours(r, b).replace("±", "$\\pm$") for b in bench]
        cells += [r.extra.get(o, "") or "–" for o in other]
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def to_csv(rows: list[Row], bench: list[str], other: list[str], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model"] + [f"{b}_{k}" for b in bench for k in ("paper", "ours", "ours_stderr")] + other)
        for r in rows:
            cells: list[object] = [r.model]
            for b in bench:
                s = r.ours.get(b)
                cells += [
                    r.paper.get(b, ""),
                    "" if s is None else round(s[0], 2),
                    "" if s is None else round(s[1], 2),
                ]
            w.writerow(cells + [r.extra.get(o, "") for o in other])


def write_all(rows, bench, other, out_dir: str | Path, name: str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "tex": out / f"{name}.tex", "csv": out / f"{name}.csv"}
    paths["md"].write_text(to_markdown(rows, bench, other))
    paths["tex"].write_text(to_latex(rows, bench, other))
    to_csv(rows, bench, other, paths["csv"])
    return paths
