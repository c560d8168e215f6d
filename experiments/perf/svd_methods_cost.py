"""What the per-matrix SVD of TSV-M, Iso-C and Iso-CTS costs at 0.5B, next to linear and the I/O floor.

    PYTHONPATH=$PWD python experiments/perf/svd_methods_cost.py [--root outputs/perf/merge] [--lines]

Inputs: merge_bench's synthetic Qwen2.5-0.5B-shaped checkpoints (bf16, 494 M parameters, tied
embeddings; built there on first use): a base and three branches. Each tool runs once, in its own
process, from a warm page cache, after the previous output is deleted: the I/O floor (every input byte
copied out of the page cache, one output written), linear (an element-wise method: the engine's
overhead), and the three spectral methods at their defaults (embed_tokens by the mean task vector;
every other matrix by SVDs in the stats phase). `--lines` adds task arithmetic without and with
LiNeS (the modifier's cost). Prints seconds, peak
RSS and the ratios to the floor and to linear side by side; writes
experiments/perf/results/svd_methods_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "perf"))
from merge_bench import IO_FLOOR, build_models, timed  # noqa: E402

RESULTS = ROOT / "experiments" / "perf" / "results"
OURS = r"""
import sys, json
from pathlib import Path
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.methods import iso, tsv  # registers the spectral methods
from branchmerge.merge.recipe import parse_steps
a = json.loads(sys.argv[1])
models = {k: Path(v) for k, v in a["models"].items()}
merge(models, parse_steps([a["step"]], set(models)), Path(a["out"]), MergeOptions(progress=False, hash_inputs=False))
"""
INPUTS = {"base": "base", "inputs": ["v1", "v2", "v3"]}
CASES = {
    "linear": {"method": "linear", "inputs": INPUTS["inputs"]},
    "tsv_m": {"method": "tsv_m", **INPUTS},
    "iso_c": {"method": "iso_c", **INPUTS},
    "iso_cts": {"method": "iso_cts", **INPUTS},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=ROOT / "outputs" / "perf" / "merge")
    ap.add_argument("--lines", action="store_true", help="also task arithmetic with and without LiNeS")
    args = ap.parse_args()
    # built in a child, as merge_bench does (a parent's peak RSS survives into the children it starts)
    subprocess.run([sys.executable, str(ROOT / "experiments/perf/merge_bench.py"), "--build-only",
                    "--root", str(args.root)], check=True)  # fmt: skip
    paths = {k: str(v) for k, v in build_models(args.root / "models").items()}
    for p in paths.values():  # warm the page cache
        for f in Path(p).glob("*.safetensors"):
            with f.open("rb") as fh:
                while fh.read(1 << 24):
                    pass
    cases = dict(CASES)
    if args.lines:  # the modifier's own cost, on an element-wise task-vector method
        cases["task_arithmetic"] = {"method": "task_arithmetic", **INPUTS}
        cases["task_arithmetic+lines"] = {**cases["task_arithmetic"], "lines": {"alpha": 0.5, "beta": 0.5}}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = args.root / "out_svd"
    rows: dict[str, dict] = {}
    for label, step in {"io_floor": None, **cases}.items():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        os.sync()
        if step is None:
            ins = [paths[n] for n in ["base", *INPUTS["inputs"]]]
            cmd = [sys.executable, "-c", IO_FLOOR, json.dumps(ins), str(out)]
        else:
            a = {"models": paths, "step": {"name": "m", **step}, "out": str(out)}
            cmd = [sys.executable, "-c", OURS, json.dumps(a)]
        rows[label] = timed(cmd, env)
        r, f, lin = rows[label], rows["io_floor"], rows.get("linear")
        line = f"{label:<22} {r['wall_s']:7.1f}s  peak RSS {r['peak_rss_gb']:.2f}GB  /floor {r['wall_s'] / f['wall_s']:6.1f}x"
        if lin:
            line += f"  /linear {r['wall_s'] / lin['wall_s']:6.1f}x"
        print(line, flush=True)
        save(rows)  # after every tool: a failed tool leaves the ones before it recorded


def save(rows: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0],
    }
    (RESULTS / "svd_methods_cost.json").write_text(
        json.dumps({"results": rows, "runs": 1, "machine": machine}, indent=2)
    )


if __name__ == "__main__":
    main()
