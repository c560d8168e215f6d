"""Every registered merge method on the same branches, scored on the same items, compared pairwise.

    python experiments/merge_methods_panel/run.py                  # toy, after `make demo`: math + science
    python experiments/merge_methods_panel/run.py --methods ties,arcee_fusion,tsv_m
    python experiments/merge_methods_panel/run.py --scale paper --branches math,code,science \\
        --eval-args "backend=vllm tensor_parallel_size=8 dtype=bfloat16"      # the 32B branches

For each method: one `python merge.py` (its documented defaults from conf/merge/<method>.yaml, with
the few settings in SETTINGS that the paper's comparison uses), one `python evaluate.py`, then every
method against each reference (TIES and Arcee Fusion by default) as a paired difference on the same
items (paired bootstrap 95% interval, exact McNemar), per benchmark and on the mean. Methods whose
inputs cannot be met are listed with the reason (a method for exactly 2 models given 3 branches, Fisher
merging without saved Fisher files). A method taking one model onto a base (Arcee Fusion) is chained
as the released TinyR1 recipe is: ((b1 ⊕ b2, base b2) ⊕ b3, base b3). ACM's activation pass reads the
branches' own train splits (CALIBRATION).

Resumable: merge.py reuses an identical finished merge, and a method's evaluation is skipped when its
results.json scored exactly these weights. Writes <out>/panel.md, panel.csv, panel.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from branchmerge.eval.harness import model_hash  # noqa: E402
from branchmerge.merge.methods import METHODS  # noqa: E402
from branchmerge.report.paired import (  # noqa: E402
    LEVEL,
    Paired,
    align,
    load_item_scores,
    paired_diff,
    paired_diff_mean,
    samples_file,
)

SCALES = {  # scale -> (base model, branch export pattern, eval suite)
    "toy": ("{root}/branchmerge/toy/assets/toy_base", "{out}/train/toy_{d}_branch/export", "toy"),
    "paper": ("{model_dir}/DeepSeek-R1-Distill-Qwen-32B", "{out}/train/{d}_branch/export", "paper"),
}
# calibration records of methods that read activations (ACM): each branch's own train split
CALIBRATION = {"toy": "{out}/toy_world/data/{d}/train.jsonl", "paper": "{data_dir}/branches/{d}/train.jsonl"}
# settings the paper's comparison (and the demo's Figure 2 rows) use where a method's default differs
SETTINGS = {
    "ties": ["params.density=0.5"],
    "dare_ties": ["params.density=0.5"],
    "dare_linear": ["params.density=0.5"],
}
NOT_FOR_PANEL = {"passthrough"}  # copies layers; it is not a way of combining branches


def plan(branches: list[str], fisher: bool) -> dict[str, dict | str]:
    """method -> its merge.py overrides (models named base and the branch names), or why it is left out."""
    out: dict[str, dict | str] = {}
    for name, m in sorted(METHODS.items()):
        n = len(branches)
        if name in NOT_FOR_PANEL:
            out[name] = "not a merge of branches"
        elif m.needs_importance and not fisher:
            out[name] = "needs each branch's fisher.safetensors (train with fisher.enabled=true)"
        elif m.max_models == 1:
            out[name] = {"steps": _chain(name, branches)}
        elif n < m.min_models or (m.max_models is not None and n > m.max_models):
            out[name] = f"takes {m.min_models}-{m.max_models or 'any'} models, the panel has {n} branches"
        else:
            out[name] = {"base": "base" if m.needs_base else None, "inputs": branches}
    return out


def _chain(method: str, branches: list[str]) -> list[dict]:
    """((b1 ⊕ b2, base b2) ⊕ b3, base b3) ...: each step merges the running result onto the next branch."""
    steps, acc = [], branches[0]
    for i, b in enumerate(branches[1:]):
        name = f"step{i}" if i < len(branches) - 2 else "panel"
        steps.append({"name": name, "method": method, "base": b, "inputs": [acc], "params": {}})
        acc = name
    return steps


def merge_args(
    method: str, spec: dict, models: dict[str, str], out_dir: Path, calibration: list[str] = ()
) -> list[str]:
    args = [f"merge={method}", f"output_dir={out_dir}", "options.progress=false", f"run_name=panel_{method}"]
    args += [f"+models.{k}={v}" for k, v in models.items()]
    if METHODS[method].needs_activations:
        args.append(f"calibration.files=[{','.join(map(str, calibration))}]")
    if "steps" in spec:
        params = _defaults(method)
        steps = [{**s, "params": params} for s in spec["steps"]]
        return [*args, f"steps={_hydra(steps)}"]
    args.append(f"inputs=[{','.join(spec['inputs'])}]")
    if spec["base"]:
        args.append(f"base={spec['base']}")
    return args + SETTINGS.get(method, [])


def _hydra(v) -> str:
    """A value in Hydra's override grammar (flow YAML with bare keys)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_hydra(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_hydra(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _defaults(method: str) -> dict:
    import yaml

    return dict(yaml.safe_load((ROOT / "conf" / "merge" / f"{method}.yaml").read_text()).get("params") or {})


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed: python {shlex.join(cmd)}\n--- {log} ---\n{log.read_text()[-3000:]}")


def evaluated(eval_dir: Path, model: Path) -> bool:
    res = eval_dir / "results.json"
    return res.exists() and json.loads(res.read_text())["model"]["hash"] == model_hash(model)


def compare(eval_dirs: dict[str, Path], refs: list[str], resamples: int) -> list[dict]:
    """One row per (method, reference, task) and per (method, reference) on the mean over tasks."""
    items = {m: load_item_scores(samples_file(d)) for m, d in eval_dirs.items()}
    rows = []
    for ref in refs:
        for name in eval_dirs:
            if name == ref:
                continue
            tasks = sorted(items[ref])
            pairs = [align(items[name][t], items[ref][t], task=t, source_a=name, source_b=ref) for t in tasks]
            per_task = [paired_diff(a, b, resamples=resamples) for a, b in pairs]
            mean = paired_diff_mean(pairs, resamples=resamples)
            for task, p in [*zip(tasks, per_task), ("mean", mean)]:
                rows.append({"method": name, "reference": ref, "task": task, **_cells(p)})
    return rows


def _cells(p: Paired) -> dict:
    return {
        "a": round(100 * p.mean_a, 2),
        "b": round(100 * p.mean_b, 2),
        "delta": round(100 * p.delta, 2),
        "lo": round(100 * p.lo, 2),
        "hi": round(100 * p.hi, 2),
        "excludes_zero": p.excludes_zero,
        "p_mcnemar": p.p_mcnemar,
        "n": p.n,
    }


def scores(eval_dirs: dict[str, Path]) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for name, d in eval_dirs.items():
        tasks = json.loads((d / "results.json").read_text())["tasks"]
        out[name] = {t: (100 * v["pass@1"], 100 * v.get("stderr", 0.0)) for t, v in tasks.items()}
    return out


def markdown(table: dict, rows: list[dict], skipped: dict[str, str], refs: list[str]) -> str:
    tasks = list(next(iter(table.values())))
    lines = ["| method | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, s in sorted(table.items(), key=lambda kv: -sum(v[0] for v in kv[1].values())):
        cells = [f"{s[t][0]:.1f} ± {s[t][1]:.1f}" for t in tasks]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {sum(s[t][0] for t in tasks) / len(tasks):.1f} |"
        )
    for ref in refs:
        lines += [
            "",
            f"**Paired difference vs {ref}** (points, {100 * LEVEL:.0f}% interval; bold: excludes 0)",
            "",
        ]
        lines += ["| method | " + " | ".join([*tasks, "mean"]) + " |", "|---" * (len(tasks) + 2) + "|"]
        by = {}
        for r in rows:
            if r["reference"] == ref:
                by.setdefault(r["method"], {})[r["task"]] = r
        for name, cells in sorted(by.items()):
            fmt = [
                (lambda c: f"**{c}**" if r["excludes_zero"] else c)(
                    f"{r['delta']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]"
                )
                for r in (cells[t] for t in [*tasks, "mean"])
            ]
            lines.append(f"| {name} | " + " | ".join(fmt) + " |")
    if skipped:
        lines += ["", "Left out: " + "; ".join(f"{k} ({v})" for k, v in sorted(skipped.items()))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="toy")
    ap.add_argument("--branches", default="math,science", help="branch names, in merge order")
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    ap.add_argument("--references", default="ties,arcee_fusion")
    ap.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="where the branches were trained")
    ap.add_argument(
        "--model-dir", default=str(ROOT / "models"), help="paper scale: folder of the base student"
    )
    ap.add_argument("--out", type=Path, default=None, help="default: <outputs>/merge_methods_panel_<scale>")
    ap.add_argument("--eval-args", default="", help="extra evaluate.py overrides (backend, tensor parallel)")
    ap.add_argument("--fisher", action="store_true", help="the branch exports hold fisher.safetensors")
    ap.add_argument("--resamples", type=int, default=10_000)
    a = ap.parse_args(argv)
    branches = a.branches.split(",")
    refs = a.references.split(",")
    out = a.out or a.outputs / f"merge_methods_panel_{a.scale}"
    base_pat, branch_pat, suite = SCALES[a.scale]
    models = {"base": base_pat.format(root=ROOT, model_dir=a.model_dir)}
    models |= {d: branch_pat.format(out=a.outputs, d=d) for d in branches}
    missing = [f"{k}: {v}" for k, v in models.items() if not (Path(v) / "config.json").exists()]
    if missing:
        raise SystemExit(f"missing input models ({'; '.join(missing)}); train the branches first (README)")
    specs = plan(branches, a.fisher)
    calibration = [CALIBRATION[a.scale].format(out=a.outputs, data_dir=ROOT / "data", d=d) for d in branches]
    chosen = a.methods.split(",") if a.methods else list(specs)
    unknown = [m for m in chosen + refs if m not in specs]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {sorted(specs)}")
    skipped = {m: specs[m] for m in chosen if isinstance(specs[m], str)}
    todo = [m for m in dict.fromkeys([*refs, *chosen]) if not isinstance(specs[m], str)]
    eval_dirs = {}
    for m in todo:
        model_dir = out / "models" / m
        print(f"[{m}] merge", flush=True)
        run(
            ["merge.py", *merge_args(m, specs[m], models, model_dir, calibration), f"paths.output_dir={out}"],
            out / "logs" / f"{m}.merge.log",
        )
        eval_dirs[m] = out / "eval" / f"panel_{m}_{suite}"
        if not evaluated(eval_dirs[m], model_dir):
            print(f"[{m}] evaluate", flush=True)
            cmd = ["evaluate.py", f"model_path={model_dir}", f"eval={suite}", f"run_name=panel_{m}_{suite}"]
            cmd.append(f"generation_cache={a.outputs / 'eval_cache'}")  # shared with the demo's evaluations
            run([*cmd, f"paths.output_dir={out}", *shlex.split(a.eval_args)], out / "logs" / f"{m}.eval.log")
    rows = compare(eval_dirs, [r for r in refs if r in eval_dirs], a.resamples)
    table = scores(eval_dirs)
    md = markdown(table, rows, skipped, refs)
    (out / "panel.md").write_text(md)
    with (out / "panel.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from branchmerge.report.sweep_plots import plot_methods

    plot_methods(table, out / "panel.png", f"Merge methods on the {a.scale} {' + '.join(branches)} branches")
    print(md)
    print(f"wrote {out / 'panel.md'}, panel.csv, panel.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
