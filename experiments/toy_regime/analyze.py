"""Gain retention of each merge, per cell and domain, and the default toy branch recipe it implies.

    python experiments/toy_regime/analyze.py --out outputs/toy_regime      # -> <out>/results/

For a cell (base, lr, steps, seed) and domain d, with pass@1 in points on the val items:

    gain_d      = expert_d - base_d                      (the domain's own expert)
    retention_d = (merge_d - base_d) / gain_d            (undefined when gain_d <= 0)

Writes results/cells.csv (one row per cell, seed, domain and model, with a 95% item-bootstrap interval
of the retention: items resampled jointly for base, expert and merge), results/summary.md (means ±
standard deviation over seeds, the criterion's pick, each group's measured cost) and
results/regime_map.png (min-over-domains retention against lr x steps, one line per method, one panel
per base). Per-item verdicts stay in <out>/evals/<model>/samples.jsonl for paired tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

DOMAINS = ("math", "code", "science")
MODELS = ("tinyr1", "linear", "ties", "mixture")
MIN_GAIN, MIN_RETENTION = 5.0, 0.70  # the selection criterion (README.md), fixed before any result
_CELL = re.compile(r"^(?P<base>[^/]+)/lr(?P<lr>[^_]+)_s(?P<seed>\d+)/step(?P<step>\d+)/(?P<model>[^/]+)$")


def load_evals(out: Path) -> dict[tuple, dict[str, np.ndarray]]:
    """{(base, lr, seed, step, model) or (base, None, None, None, "base"): {domain: verdicts}}, the
    verdicts (0/1 per item, first sample) ordered by doc_id, from every finished evaluation."""
    found = {}
    for res in sorted((out / "evals").rglob("results.json")):
        key = res.parent.relative_to(out / "evals").as_posix()
        if key.endswith("/base"):
            k = (key.removesuffix("/base"), None, None, None, "base")
        elif m := _CELL.match(key):
            k = (
                m["base"],
                float(m["lr"]),
                int(m["seed"]),
                int(m["step"]),
                m["model"].removesuffix("_expert"),
            )
        else:
            continue
        by_task: dict[str, dict[int, int]] = defaultdict(dict)
        for line in (res.parent / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("sample", 0) == 0:
                by_task[row["task"].removeprefix("toy_")][row["doc_id"]] = int(row["verdict"])
        found[k] = {d: np.array([v for _, v in sorted(items.items())]) for d, items in by_task.items()}
    return found


def retention_interval(base, expert, merge, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of (mean merge - mean base) / (mean expert - mean base) over items
    resampled together (the three arrays are aligned by item)."""
    n = min(len(base), len(expert), len(merge))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    b, e, m = base[:n][idx].mean(1), expert[:n][idx].mean(1), merge[:n][idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(e - b > 0, (m - b) / (e - b), np.nan)
    if np.isnan(r).all():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(r, [2.5, 97.5])
    return float(lo), float(hi)


def cell_rows(evals: dict) -> list[dict]:
    """One row per (cell, seed, domain, model) where the base, that domain's expert and the model
    were scored."""
    rows = []
    for (base, lr, seed, step, model), scores in sorted(evals.items(), key=str):
        if model not in MODELS:
            continue
        b = evals.get((base, None, None, None, "base"), {})
        for d in DOMAINS:
            e = evals.get((base, lr, seed, step, d), {}).get(d)
            if d not in b or e is None or d not in scores:
                continue
            base_s, exp_s, score = (100 * float(x.mean()) for x in (b[d], e, scores[d]))
            gain = exp_s - base_s
            lo, hi = retention_interval(b[d], e, scores[d])
            rows.append(
                {
                    "base": base,
                    "lr": lr,
                    "steps": step,
                    "update": lr * step,
                    "seed": seed,
                    "domain": d,
                    "model": model,
                    "base_score": round(base_s, 2),
                    "expert_score": round(exp_s, 2),
                    "expert_gain": round(gain, 2),
                    "score": round(score, 2),
                    "retention": round((score - base_s) / gain, 4) if gain > 0 else float("nan"),
                    "retention_lo": round(lo, 4),
                    "retention_hi": round(hi, 4),
                    "items": int(len(scores[d])),
                }
            )
    return rows


def seed_stats(rows: list[dict]) -> dict[tuple, dict]:
    """{(base, lr, steps, model, domain): {gain, retention, score: (mean, sd, n_seeds)}}."""
    acc: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        k = (r["base"], r["lr"], r["steps"], r["model"], r["domain"])
        for f, src in (("gain", "expert_gain"), ("retention", "retention"), ("score", "score")):
            acc[k][f].append(r[src])
    out = {}
    for k, fields in acc.items():
        out[k] = {}
        for f, vals in fields.items():
            v = np.array(vals, dtype=float)
            ok = v[~np.isnan(v)]
            mean = float(ok.mean()) if len(ok) else float("nan")
            out[k][f] = (mean, float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, len(ok))
    return out


def settings(stats: dict, base: str) -> list[tuple[float, int]]:
    return sorted({(lr, st) for (b, lr, st, _, _) in stats if b == base}, key=lambda s: (s[0] * s[1], s[1]))


def min_over_domains(stats: dict, base: str, lr: float, st: int, model: str, field: str) -> float:
    vals = [stats.get((base, lr, st, model, d), {}).get(field, (float("nan"),))[0] for d in DOMAINS]
    return float("nan") if any(np.isnan(v) for v in vals) else min(vals)


def criterion(stats: dict, base: str) -> tuple[float, int] | None:
    """The README's rule on seed means: the largest lr x steps where every expert gains >= 5 points on
    its own domain and linear keeps >= 70% of every expert's gain; equal products: fewer steps."""
    ok = [
        (lr, st)
        for lr, st in settings(stats, base)
        if min_over_domains(stats, base, lr, st, "linear", "gain") >= MIN_GAIN
        and min_over_domains(stats, base, lr, st, "linear", "retention") >= MIN_RETENTION
    ]
    return max(ok, key=lambda s: (s[0] * s[1], -s[1])) if ok else None


def nearest_pick(stats: dict, base: str) -> tuple[float, int] | None:
    """Where to spend extra seeds: the criterion's pick; else, among settings whose experts all gain
    >= 5 points, the best min-over-domains linear retention; else the largest minimum expert gain."""
    pick = criterion(stats, base)
    if pick is not None:
        return pick
    cand = settings(stats, base)
    gains = {s: min_over_domains(stats, base, *s, "linear", "gain") for s in cand}
    strong = [s for s in cand if gains[s] >= MIN_GAIN]
    if strong:
        return max(
            strong,
            key=lambda s: np.nan_to_num(min_over_domains(stats, base, *s, "linear", "retention"), nan=-9),
        )
    valid = [s for s in cand if not np.isnan(gains[s])]
    return max(valid, key=lambda s: gains[s]) if valid else None


def _fmt(t: tuple, pct: bool = False) -> str:
    mean, sd, n = t
    if np.isnan(mean):
        return "–"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.1f}")
    return f"{f(mean)} ± {f(sd)}" if n > 1 else f(mean)


def summary(stats: dict, base_scores: dict, costs: dict[str, float], bases: list[str]) -> str:
    lines = ["# Toy regime study: gain retention of the merges", ""]
    lines += [
        "Retention = (merge − base) / (expert − base) on each domain's val items, seed mean ± sd "
        "(sd only with ≥ 2 seeds). Gains in pass@1 points. Criterion: README.md.",
        "",
    ]
    for base in bases:
        own = base_scores.get(base, {})
        lines += [f"## base `{base}`: " + ", ".join(f"{d} {own.get(d, '–')}" for d in DOMAINS), ""]
        head = "| lr | steps | lr×steps | seeds | gain math | gain code | gain sci | linear ret. m/c/s | tinyr1 min ret. | ties min ret. | mixture m/c/s |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for lr, st in settings(stats, base):
            g = [stats.get((base, lr, st, "linear", d), {}).get("gain", (np.nan, 0, 0)) for d in DOMAINS]
            lin = [
                _fmt(stats.get((base, lr, st, "linear", d), {}).get("retention", (np.nan, 0, 0)), True)
                for d in DOMAINS
            ]
            mins = [min_over_domains(stats, base, lr, st, m, "retention") for m in ("tinyr1", "ties")]
            mix = [stats.get((base, lr, st, "mixture", d), {}).get("score", (np.nan, 0, 0)) for d in DOMAINS]
            seeds = max((t[2] for t in g), default=0)
            lines.append(
                f"| {lr:.0e} | {st} | {lr * st:.1e} | {seeds} | "
                + " | ".join(_fmt(t) for t in g)
                + f" | {' / '.join(lin)} | "
                + " | ".join("–" if np.isnan(v) else f"{100 * v:.0f}%" for v in mins)
                + " | "
                + (" / ".join(f"{t[0]:.1f}" for t in mix) if not np.isnan(mix[0][0]) else "–")
                + " |"
            )
        pick = criterion(stats, base)
        lines += [
            "",
            f"**Criterion pick for `{base}`:** "
            + (
                f"lr {pick[0]:.0e}, {pick[1]} steps (lr×steps {pick[0] * pick[1]:.1e})"
                if pick
                else "none qualifies"
            ),
            "",
        ]
    if costs:
        lines += ["## Measured cost per group (one run per domain, its merges and evaluations)", ""]
        lines += ["| group | core-seconds |", "|---|---|"]
        lines += [f"| {g} | {s:.0f} |" for g, s in sorted(costs.items())]
    return "\n".join(lines) + "\n"


def group_costs(out: Path) -> dict[str, float]:
    """Seconds of every finished job (its done.json), summed per group (base/lr..._s...)."""
    costs: dict[str, float] = defaultdict(float)
    for done in out.rglob("done.json"):
        info = json.loads(done.read_text())
        if "group" in info and info["group"]:
            costs[info["group"]] += float(info.get("seconds", 0.0))
    return dict(costs)


def plot(stats: dict, bases: list[str], path: Path, title: str | None = None) -> Path:
    """Per base two rows of three panels, one per domain: each merge's (and the mixture's) retention
    of that domain's expert gain against lr x steps (one line per method and lr; retention clipped to
    [-1, 2], undefined where the expert does not gain), and the expert's own-domain gain, with the
    criterion's thresholds (70%, 5 points) and its pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2 * len(bases), len(DOMAINS), figsize=(13, 6.5 * len(bases)), squeeze=False, sharex=True
    )
    styles = ["-", "--", ":", "-."]
    for j, base in enumerate(bases):
        lrs = sorted({lr for lr, _ in settings(stats, base)})
        pick = criterion(stats, base)
        for c, d in enumerate(DOMAINS):
            top, bottom = axes[2 * j][c], axes[2 * j + 1][c]
            for k, lr in enumerate(lrs):  # one line per lr and method: steps grow along it
                steps = [st for lr_, st in settings(stats, base) if lr_ == lr]
                tag = f" (lr {lr:.0e})" if len(lrs) > 1 else ""
                for i, model in enumerate(MODELS):
                    pts = [
                        (lr * st, stats.get((base, lr, st, model, d), {}).get("retention", (np.nan,))[0])
                        for st in steps
                    ]
                    pts = [(x, float(np.clip(y, -1, 2))) for x, y in pts if not np.isnan(y)]
                    if pts:
                        top.plot(*zip(*pts), marker="o", ls=styles[k % 4], color=f"C{i}", label=model + tag)
                gains = [
                    (lr * st, stats.get((base, lr, st, "linear", d), {}).get("gain", (np.nan,))[0])
                    for st in steps
                ]
                gains = [(x, y) for x, y in gains if not np.isnan(y)]
                if gains:
                    bottom.plot(*zip(*gains), marker="s", ls=styles[k % 4], color="k", label=f"lr {lr:.0e}")
            for ax, thr in ((top, MIN_RETENTION), (bottom, MIN_GAIN)):
                ax.axhline(thr, ls="--", color="grey")
                ax.set_xscale("log")
                if pick:
                    ax.axvline(pick[0] * pick[1], color="red", alpha=0.4)
            top.set_ylim(-1.1, 2.1)
            top.set_title(f"base {base}: {d}")
            bottom.set_xlabel("branch update size: lr × steps")
            if c == 0:
                top.set_ylabel("retention of the expert's gain")
                bottom.set_ylabel("own-domain expert gain (points)")
                if top.get_legend_handles_labels()[0]:
                    top.legend(fontsize=7)
                if len(lrs) > 1:
                    bottom.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def analyze(out: Path | list[Path], results: Path | None = None, title: str | None = None) -> dict:
    """Analyse one study folder, or several (the same base studied at other lrs or step grids, run as
    separate `--out`s): their evaluations are pooled; a model scored in two of them counts once."""
    outs = [out] if isinstance(out, Path) else list(out)
    results = results or outs[0] / "results"
    results.mkdir(parents=True, exist_ok=True)
    evals: dict = {}
    for o in outs:
        for k, v in load_evals(o).items():
            evals.setdefault(k, v)
    rows = cell_rows(evals)
    bases = list(dict.fromkeys(k[0] for k in evals))
    if rows:
        with (results / "cells.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    stats = seed_stats(rows)
    base_scores = {
        k[0]: {d: round(100 * float(v.mean()), 2) for d, v in scores.items()}
        for k, scores in evals.items()
        if k[4] == "base"
    }
    costs = {g: c for o in outs for g, c in group_costs(o).items()}
    (results / "summary.md").write_text(summary(stats, base_scores, costs, bases))
    plot(stats, bases or ["(none)"], results / "regime_map.png", title)
    return {"rows": len(rows), "picks": {b: criterion(stats, b) for b in bases}, "results": str(results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        action="append",
        default=[],
        help="the runner's --out (repeatable: studies of one base at other lrs are pooled)",
    )
    p.add_argument("--results", type=Path, default=None, help="default: <first out>/results")
    p.add_argument("--title", default=None, help="the map's title (e.g. which toy world)")
    a = p.parse_args()
    outs = a.out or [Path("outputs/toy_regime")]
    for out in outs:
        if not (out / "evals").is_dir():
            raise SystemExit(
                f"{out / 'evals'} does not exist: run experiments/toy_regime/run.py --out {out} first"
            )
    info = analyze(outs, a.results, a.title)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
