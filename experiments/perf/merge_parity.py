"""Did an engine change move any merged value, and its speed? Old revision vs this tree, side by side.

    PYTHONPATH=$PWD python experiments/perf/merge_parity.py --old-rev 0f76feb [--repeats 3] [--sets toy,bf16]

Runs every method (the toy merges: the shipped toy base and the three toy branches, fp32) and a
synthetic bf16 set (tensors past 10⁶ entries, where the sampled paths run, and one past
`chunk_elements`, where a tensor's blocks spread over the pool) through `engine.merge` twice, once
with `git archive <old-rev>`'s package and once with this tree's, each in a fresh process (the seconds are the merge's own, imports excluded), and prints
per case: entries that differ (bitwise, of all entries), the largest |difference|, and the seconds of
each (the minimum of the repeats) with their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
TOY = {
    "base": ROOT / "branchmerge/toy/assets/toy_base",
    **{d: ROOT.parent / "main/outputs/train" / f"toy_{d}_branch/export" for d in ("math", "code", "science")},
}
RUN = r"""
import json, sys, time
from pathlib import Path
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.recipe import parse_steps
a = json.loads(sys.argv[1])
models = {k: Path(v) for k, v in a["models"].items()}
steps = parse_steps(a["steps"], set(models))
t0 = time.perf_counter()
merge(models, steps, Path(a["out"]), MergeOptions(progress=False, hash_inputs=False))
print(time.perf_counter() - t0)
"""
THREE = ["math", "code", "science"]
CASES = {
    "linear": [{"method": "linear", "inputs": THREE}],
    "task_arithmetic": [
        {"method": "task_arithmetic", "base": "base", "inputs": THREE, "params": {"weight": 0.5}}
    ],
    "ties": [{"method": "ties", "base": "base", "inputs": THREE, "params": {"density": 0.3}}],
    "dare_linear": [{"method": "dare_linear", "base": "base", "inputs": THREE, "params": {"density": 0.5}}],
    "dare_ties": [{"method": "dare_ties", "base": "base", "inputs": THREE, "params": {"density": 0.3}}],
    "slerp": [{"method": "slerp", "inputs": ["math", "code"], "params": {"t": [0.2, 0.8]}}],
    "arcee_fusion": [{"method": "arcee_fusion", "base": "science", "inputs": ["math"]}],
    "tinyr1_chain": [
        {"name": "ms", "method": "arcee_fusion", "base": "science", "inputs": ["math"]},
        {"name": "final", "method": "arcee_fusion", "base": "code", "inputs": ["ms"]},
    ],
    "importance_fusion": [{"method": "importance_fusion", "base": "base", "inputs": THREE}],
    "fisher": [{"method": "fisher", "inputs": THREE}],
}


def synthetic(root: Path) -> dict[str, Path]:
    """Four bf16 'checkpoints' (a base and three branches at 5% noise) with 1-D, 2.1M-entry and
    4.5M-entry tensors and a layer count (per-layer parameters resolve)."""
    shapes = {
        "model.embed_tokens.weight": (5000, 896),
        **{f"model.layers.{i}.mlp.up_proj.weight": (2048, 1024) for i in range(3)},
        **{f"model.layers.{i}.input_layernorm.weight": (896,) for i in range(3)},
    }
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    out = {}
    for i, name in enumerate(["base", *THREE]):
        d = root / name
        d.mkdir(parents=True)
        sd = {k: (v + (0.001 * i) * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        fisher = {k: torch.rand(v.shape, generator=g) ** 4 for k, v in base.items()}
        save_file(fisher, d / "fisher.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 3}))
        out[name] = d
    return out


def run(tree: Path, models: dict, steps: list, out: Path) -> float:
    """Seconds of the merge itself (in a fresh process, imports excluded)."""
    args = {"models": {k: str(v) for k, v in models.items()}, "steps": steps, "out": str(out)}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(args)],
        check=True,
        cwd=tree,
        env={"PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    )
    return float(proc.stdout.split()[-1])


def compare(a: Path, b: Path) -> tuple[float, float]:
    """(fraction of entries that differ bitwise, largest |difference|)."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diff = total = 0
    worst = 0.0
    for k in x:
        bits = x[k].view(torch.int16 if x[k].element_size() == 2 else torch.int32)
        other = y[k].view(bits.dtype)
        diff += int((bits != other).sum())
        total += x[k].numel()
        worst = max(worst, float((x[k].float() - y[k].float()).abs().max()))
    return diff / total, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sets", default="toy,bf16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.old_rev, "branchmerge"], cwd=ROOT, check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        wanted = args.sets.split(",")
        sets = {"toy": TOY} if "toy" in wanted else {}
        if "bf16" in wanted:
            sets["bf16"] = synthetic(tmp / "synthetic")
        print(f"{'case':28s} {'differ':>10s} {'max|d|':>9s} {'old s':>7s} {'new s':>7s} {'new/old':>7s}")
        for set_name, models in sets.items():
            for case in args.cases.split(","):
                if case == "fisher" and not all((p / "fisher.safetensors").exists() for p in models.values()):
                    continue
                steps = [{"name": "m", **s} if "name" not in s else s for s in CASES[case]]
                times = {"old": [], "new": []}
                for _ in range(args.repeats):
                    for label, tree in (("old", old), ("new", ROOT)):
                        times[label].append(run(tree, models, steps, tmp / label / case / set_name))
                frac, worst = compare(tmp / "old" / case / set_name, tmp / "new" / case / set_name)
                to, tn = min(times["old"]), min(times["new"])
                print(
                    f"{set_name + ' ' + case:28s} {frac:10.2e} {worst:9.2e} {to:7.2f} {tn:7.2f} {tn / to:7.2f}"
                )


if __name__ == "__main__":
    main()
