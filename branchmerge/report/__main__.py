"""Paper tables with our numbers beside the paper's.

    python -m branchmerge.report table2 \
        --result "math expert=outputs/eval/math_branch_paper/results.json" \
        --result "(math & science) & code = TinyR1-32B-Preview=outputs/eval/tinyr1_merge_paper/results.json" \
        --out experiments/tinyr1_table2/out
    python -m branchmerge.report table1 --out experiments/tinyr1_table1/out     # the paper's column alone
    python -m branchmerge.report sweep outputs/sweeps/toy_ties_grid             # a sweep's table + plots
    python -m branchmerge.report paired outputs/eval/toy_merge_ties_toy outputs/eval/toy_base_toy

Tables: writes <out>/<table>.{md,tex,csv} and prints the Markdown. Sweeps: prints the trials best
first, writes <sweep>/plots/*.png (score against each coefficient, the Pareto front across domains).
Paired: one line per task of A − B on the shared items (Δ, paired bootstrap 95% interval, exact
McNemar p and the discordant counts when verdicts are binary).
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


def sweep_main(argv: list[str]) -> None:
    from branchmerge.report.sweep_plots import plot_sweep
    from branchmerge.sweep.results import flatten, load_results

    ap = argparse.ArgumentParser(prog="python -m branchmerge.report sweep")
    ap.add_argument("sweep_dir", type=Path, help="a folder holding results.jsonl")
    ap.add_argument("--top", type=int, default=10, help="trials to print, best first")
    ap.add_argument("--minimize", action="store_true", help="lower objective is better")
    ap.add_argument("--copy-best", type=Path, metavar="DEST", help="copy the best trial's merged model here")
    args = ap.parse_args(argv)
    rows = load_results(args.sweep_dir / "results.jsonl")
    if not rows:
        ap.error(f"no results.jsonl with trials in {args.sweep_dir}")
    flat = sorted(flatten(rows), key=lambda r: r["objective"], reverse=not args.minimize)
    cols = [c for c in flat[0] if c not in ("error", "trial") and not c.endswith("_stderr")]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in flat[: args.top]:
        print("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    print(f"{len(rows)} trials ({sum(r['status'] != 'ok' for r in rows)} failed)")
    for p in plot_sweep(args.sweep_dir):
        print(f"wrote {p}")
    if args.copy_best:
        from branchmerge.sweep.results import copy_best

        direction = "minimize" if args.minimize else "maximize"
        print(
            f"best trial's model copied to {copy_best(args.sweep_dir / 'results.jsonl', args.copy_best, direction)}"
        )


def paired_main(argv: list[str]) -> None:
    from branchmerge.report.paired import LEVEL, RESAMPLES, compare_dirs, format_line

    ap = argparse.ArgumentParser(prog="python -m branchmerge.report paired")
    ap.add_argument("a", type=Path, help="eval folder of model A (holds samples.jsonl)")
    ap.add_argument("b", type=Path, help="eval folder of model B, scored on the same items")
    ap.add_argument("--tasks", nargs="+", help="tasks to compare (default: every task of A)")
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples over items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=float, default=LEVEL, help="interval coverage")
    args = ap.parse_args(argv)
    try:
        res = compare_dirs(
            args.a, args.b, args.tasks, resamples=args.resamples, seed=args.seed, level=args.level
        )
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    print(f"A = {args.a}\nB = {args.b}\n(* = interval excludes 0)")
    for task, p in res.items():
        print(format_line(task, p, args.level))


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    if argv[:1] == ["paired"]:
        return paired_main(argv[1:])
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
