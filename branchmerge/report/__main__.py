"""Paper tables with our numbers beside the paper's.

    python -m branchmerge.report table2 \
        --result "math expert=outputs/eval/math_branch_paper/results.json" \
        --result "(math & science) & code = TinyR1-32B-Preview=outputs/eval/tinyr1_merge_paper/results.json" \
        --out experiments/tinyr1_table2/out
    python -m branchmerge.report table1 --out experiments/tinyr1_table1/out     # the paper's column alone

Writes <out>/<table>.{md,tex,csv} and prints the Markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from branchmerge.report.tables import build, to_markdown, write_all

ROOT = Path(__file__).resolve().parents[2]
PAPER = {
    "table1": ROOT / "experiments" / "tinyr1_table1" / "paper.csv",
    "table2": ROOT / "experiments" / "tinyr1_table2" / "paper.csv",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m branchmerge.report", description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=[*PAPER, "custom"])
    ap.add_argument("--paper", type=Path, help="paper CSV (default: the table's own under experiments/)")
    ap.add_argument(
        "--result",
        action="append",
        default=[],
        metavar="ROW=results.json",
        help="a row label and the evaluate.py results file for it (the last '=' splits)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    results = {}
    for item in args.result:
        label, _, path = item.rpartition("=")
        if not label or not Path(path).exists():
            ap.error(f"--result needs ROW=path/to/results.json with an existing file, got {item!r}")
        results[label] = path
    paper = args.paper or PAPER.get(args.table)
    rows, bench, other = build(paper, results)
    paths = write_all(rows, bench, other, args.out, args.table)
    print(to_markdown(rows, bench, other))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
