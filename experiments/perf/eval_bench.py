"""Toy evaluation throughput, before and after the slot decoder / reference-program runs / generation cache.

    python experiments/perf/eval_bench.py --toy-dir /tmp/toy          # ~6-8 min on 2 cores (3 x 1000 items)
    python experiments/perf/eval_bench.py --toy-dir /tmp/toy --limit 256

Each configuration is one `python evaluate.py model_path=<shipped toy base> eval=toy threads=1`
process (start-up, lm-eval, generation and sandbox grading all counted), run one after another:

    before       the code before this change (`git archive` of the parent of the commit that added
                 `resolve_decoder` to branchmerge/eval/harness.py): HFLM + HF generate, batch 64
    hf           this code, decoder=hf (HF generate; reference programs still run beside it)
    slots        this code, defaults: decoder=slots on CPU, a fresh (empty) generation cache
    slots+refs   a copy of that cache with its generations deleted: the model generates again, the
                 toy code reference outputs are reused (every evaluation after the first on a test set:
                 the demo's other models)
    slots+cache  the same again on the cache the slots run filled (generation and programs skipped)

Prints wall seconds, CPU seconds (process + children) and items/s per configuration, each one's
ratio to `before`, how many responses are string-equal to `before`'s, and the 1-minute load
average when each run started (other users of a shared machine slow every run). The toy world
(`--toy-dir`) is built once with `python distill.py +experiment=toy_data paths.toy_dir=<dir>`
(~80 s) when missing. Writes experiments/perf/results/eval_bench.json with the machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "perf" / "results"
MODEL = ROOT / "branchmerge" / "toy" / "assets" / "toy_base"
TASK = "{{name: toy_{d}, n: 1, temperature: 0.0, top_p: 1.0, max_gen_toks: 320, limit: {limit}}}"


def before_tree(dest: Path) -> str:
    """Export the revision before the slot decoder into `dest`; its commit id."""
    added = subprocess.run(
        ["git", "log", "--format=%H", "--reverse", "-S", "def resolve_decoder", "--", "branchmerge/eval/harness.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if not added:
        raise SystemExit(
            "no commit adds resolve_decoder to branchmerge/eval/harness.py: nothing to compare with"
        )
    rev = f"{added[0]}^"
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def ensure_toy(toy_dir: Path) -> None:
    if (toy_dir / "manifest.json").exists():
        return
    cmd = [sys.executable, "distill.py", "+experiment=toy_data", f"paths.toy_dir={toy_dir}"]
    print("building the toy world:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run(tree: Path, out: Path, toy_dir: Path, limit: str, extra: list[str]) -> dict:
    """One evaluate.py process; wall and CPU seconds, results.json and the responses."""
    tasks = ",".join(TASK.format(d=d, limit=limit) for d in ("math", "code", "science"))
    cmd = [
        sys.executable, "evaluate.py", f"model_path={MODEL}", "eval=toy", f"eval.tasks=[{tasks}]",
        "threads=1", f"paths.toy_dir={toy_dir}", f"paths.output_dir={out}", f"hydra.run.dir={out}/run", *extra,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)}
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads((out / "run" / "results.json").read_text())
    samples = [json.loads(x) for x in (out / "run" / "samples.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "load_1m_at_start": load,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "items": len(samples),
        "eval_s": res["seconds"],
        "task_s": {k: v["seconds"] for k, v in res["tasks"].items()},
        "pass@1": {k: v["pass@1"] for k, v in res["tasks"].items()},
        "decoder": res.get("decoder", "hf"),
        "generation_cache": res.get("generation_cache"),
        "responses": [(s["task"], s["question"], s["response"]) for s in samples],
    }


def without_generations(cache: Path, dest: Path) -> None:
    """Copy the generation cache `cache` to `dest` and delete its generations (keeping the rest)."""
    dest.mkdir()
    src = sqlite3.connect(cache / "generations.sqlite")
    with sqlite3.connect(dest / "generations.sqlite") as db:
        src.backup(db)
        db.execute("DELETE FROM gen")
    src.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy-dir", default="/tmp/branchmerge_eval_bench_toy")
    ap.add_argument("--limit", default="null", help="items per domain (null: the whole test set)")
    ap.add_argument("--out", default=str(RESULTS / "eval_bench.json"))
    args = ap.parse_args()
    toy = Path(args.toy_dir).resolve()
    ensure_toy(toy)
    load0 = os.getloadavg()
    runs, rows = {}, {}
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
        tmp = Path(tmp)
        (tmp / "before_tree").mkdir()
        rev = before_tree(tmp / "before_tree")
        cache = f"generation_cache={tmp / 'cache'}"
        configs = {
            "before": (tmp / "before_tree", []),
            "hf": (ROOT, ["decoder=hf", "generation_cache=null"]),
            "slots": (ROOT, [cache]),
            "slots+refs": (ROOT, [f"generation_cache={tmp / 'refs'}"]),
            "slots+cache": (ROOT, [cache]),
        }
        for name, (tree, extra) in configs.items():
            if name == "slots+refs":
                without_generations(tmp / "cache", tmp / "refs")
            print(f"running {name} ...", flush=True)
            r = run(tree, tmp / name, toy, args.limit, extra)
            rows[name] = r.pop("responses")
            runs[name] = r
    base = runs["before"]
    print(
        f"\n{'config':<12} {'wall s':>8} {'cpu s':>8} {'items/s':>8} {'x before':>9} {'same as before':>15}"
        f" {'load':>5}"
    )
    for name, r in runs.items():
        r["items_per_s"] = r["items"] / r["wall_s"]
        r["speedup_vs_before"] = base["wall_s"] / r["wall_s"]
        r["cpu_ratio_vs_before"] = base["cpu_s"] / r["cpu_s"]
        r["identical_to_before"] = sum(a == b for a, b in zip(rows[name], rows["before"]))
        print(f"{name:<12} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['items_per_s']:8.2f} "
              f"{r['speedup_vs_before']:8.2f}x {r['identical_to_before']:>7}/{r['items']} "
              f"{r['load_1m_at_start']:5.1f}")  # fmt: skip
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_average_before_after": [load0, os.getloadavg()],
        "before_revision": rev,
        "model": str(MODEL.relative_to(ROOT)),
        "limit_per_domain": args.limit,
        "configs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
