"""Figure 2: merge methods on the math + science experts, our numbers beside the paper's.

    python experiments/tinyr1_fig2_merge_methods/aggregate.py                 # 32B results (run.sh)
    python experiments/tinyr1_fig2_merge_methods/aggregate.py --scale toy     # the demo's toy results

Reads evaluate.py's results.json per row (outputs/eval/<run>_<suite>/), writes <out>/fig2.{md,tex,csv}
(the paper column from paper.csv: it reports only GPQA-Diamond) and <out>/fig2_merge_methods.png
(every method on every benchmark, ± standard error).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from branchmerge.report.sweep_plots import plot_methods
from branchmerge.report.tables import BENCHMARKS, build, to_markdown, write_all

HERE = Path(__file__).resolve().parent
ROWS = {  # row label -> (run name at 32B, run name in the toy world)
    "math expert": ("math_branch", "toy_math_branch"),
    "science expert": ("science_branch", "toy_science_branch"),
    "model soup": ("fig2_soup", "toy_merge_soup"),
    "DARE-linear": ("fig2_dare_linear", "toy_merge_dare_linear"),
    "DARE-TIES": ("fig2_dare_ties", "toy_merge_dare_ties"),
    "TIES": ("fig2_ties", "toy_merge_ties"),
    "Arcee Fusion": ("fig2_arcee", "toy_merge_arcee"),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["paper", "toy"], default="paper")
    ap.add_argument("--eval-dir", type=Path, default=HERE.parents[1] / "outputs" / "eval")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    suite = "paper" if args.scale == "paper" else "toy"
    results = {}
    for label, runs in ROWS.items():
        path = args.eval_dir / f"{runs[args.scale == 'toy']}_{suite}" / "results.json"
        if path.exists():
            results[label] = path
        else:
            print(f"missing {path}: row '{label}' left out")
    if not results:
        raise SystemExit(f"no results under {args.eval_dir}; run the commands in README.md first")
    rows, bench, other = build(HERE / "paper.csv", results)
    paths = write_all(rows, bench, other, args.out, "fig2")
    print(to_markdown(rows, bench, other))
    ours = {r.model: r.ours for r in rows if r.ours}
    scores = {m: {BENCHMARKS.get(b, b): ours[m][b] for b in ours[m]} for m in ours}
    png = plot_methods(
        scores, args.out / "fig2_merge_methods.png", f"Merge methods on math + science ({args.scale})"
    )
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), png]))


if __name__ == "__main__":
    main()
