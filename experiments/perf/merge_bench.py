"""Merge speed and memory: our engine vs mergekit vs the I/O floor, side by side in one run.

    make bench-merge      # builds the synthetic models and mergekit's venv on first use

Inputs: synthetic Qwen2 checkpoints of the Qwen2.5-0.5B shape (494 M parameters, bf16, tied
embeddings, 2 shards): a base and three variants (base + Gaussian deltas at 5% of each tensor's RMS).
`--layers 6 --vocab 32000` builds a mid-size checkpoint of the same layer shapes (118 M parameters)
for short runs. For linear, TIES (density 0.5), DARE-TIES (density 0.5), Arcee Fusion and mergekit's
same-architecture methods (DELLA, DELLA-linear, Breadcrumbs, Breadcrumbs-TIES, SCE, Karcher, NuSLERP,
Multi-SLERP, NearSwap, Model Stock; parameters in `METHODS`) and ACM's merge phase with coefficients
given per layer (no activation pass; mergekit has no ACM, so against the floor only): wall time and
peak RSS of each tool in its own process (warm page cache: one untimed read first), and the I/O floor (copy every
byte of every input out of the page cache, tensor by tensor, and write one output of the same size).
Tools run interleaved (ours, mergekit, floor, repeat), each after the previous output is deleted and
the page cache synced, and the minimum wall time over the repeats is reported (writing 1 GB into the
page cache takes 0.2 s or, now and then, 1.5 s on this VM, for every tool; the median and all runs are
kept in the JSON too, with the 1-minute load average at each run's start and the ratios within each
repeat). mergekit runs from its own virtualenv (`--mergekit-venv`, default outputs/perf/venv-mergekit,
built on first use) with its CLI `mergekit-yaml`. Prints ratios; writes
experiments/perf/results/merge_bench.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "perf" / "results"
QWEN05 = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)


def build_models(root: Path, seed: int = 0, shape: dict | None = None) -> dict[str, Path]:
    """base + 3 variants, written once (skipped when present); `shape` overrides QWEN05's keys."""
    from safetensors.torch import save_file

    names = ["base", "v1", "v2", "v3"]
    from transformers import Qwen2Config  # the config only; no weights are loaded

    cfg = Qwen2Config(
        **{**QWEN05, **(shape or {})}, torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"]
    )
    if all((root / n / "model.safetensors.index.json").exists() for n in names):
        for n in names:
            cfg.save_pretrained(root / n)
        return {n: root / n for n in names}
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    g = torch.Generator().manual_seed(seed)
    base = {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}
    names_sorted = list(shapes)
    half = len(names_sorted) // 2
    for n, model_seed in zip(names, range(len(names))):
        d = root / n
        d.mkdir(parents=True, exist_ok=True)
        if n == "base":
            sd = base
        else:
            gv = torch.Generator().manual_seed(1000 + model_seed)
            sd = {}
            for k, v in base.items():
                vf = v.float()
                rms = vf.pow(2).mean().sqrt()
                sd[k] = (vf + 0.05 * rms * torch.randn(v.shape, generator=gv)).to(torch.bfloat16)
        files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        parts = [names_sorted[:half], names_sorted[half:]]
        wm = {}
        for f, keys in zip(files, parts):
            save_file({k: sd[k] for k in keys}, d / f, metadata={"format": "pt"})
            wm.update({k: f for k in keys})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        cfg.save_pretrained(d)
    return {n: root / n for n in names}


def mergekit_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for pkg in ("torch==2.13.0", "mergekit"):
            subprocess.run([str(py), "-m", "pip", "install", "-q", pkg], check=True, capture_output=True)
    return py


def timed(cmd: list[str], env=None) -> dict:
    """Wall time and peak RSS of a command (via /usr/bin/time-like wait4 accounting), and the 1-minute
    load average when it started (the machine may be shared)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()[-2000:]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "load_1m": load}


IO_FLOOR = r"""
import sys, json
from pathlib import Path
import torch
from branchmerge.merge.io import Checkpoint, ShardWriter
models = [Checkpoint(p) for p in json.loads(sys.argv[1])]
out = Path(sys.argv[2])
first = models[0]
plan = [(n, first.info[n].shape, first.info[n].dtype) for n in first.names]
w = ShardWriter(out, plan)
buf = torch.empty(max(i.nbytes for i in first.info.values()), dtype=torch.uint8)
handles = {}
for n in first.names:
    for m in models:  # every byte of every input, copied out of the page cache into one reused buffer
        i = m.info[n]
        f = handles.setdefault(i.file, open(i.file, "rb", buffering=0))
        f.seek(i.offset)
        f.readinto(memoryview(buf.numpy())[: i.nbytes])
    i = first.info[n]
    w.write(n, buf[: i.nbytes].view(i.dtype).reshape(i.shape))
w.close()
"""

OURS = r"""
import sys, json
from pathlib import Path
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.recipe import parse_steps
a = json.loads(sys.argv[1])
models = {k: Path(v) for k, v in a["models"].items()}
merge(models, parse_steps([a["step"]], set(models)), Path(a["out"]), MergeOptions(progress=False, hash_inputs=False))
"""

METHODS = {
    "linear": (
        {"method": "linear", "inputs": ["v1", "v2", "v3"], "params": {"normalize": True}},
        "merge_method: linear\nparameters: {normalize: true}\nmodels:\n"
        + "".join(f"  - model: @{v}@\n    parameters: {{weight: 1.0}}\n" for v in ("v1", "v2", "v3")),
    ),
    "ties": (
        {"method": "ties", "base": "base", "inputs": ["v1", "v2", "v3"], "params": {"density": 0.5}},
        "merge_method: ties\nbase_model: @base@\nparameters: {normalize: true}\nmodels:\n"
        + "".join(
            f"  - model: @{v}@\n    parameters: {{weight: 1.0, density: 0.5}}\n" for v in ("v1", "v2", "v3")
        ),
    ),
    "dare_ties": (
        {"method": "dare_ties", "base": "base", "inputs": ["v1", "v2", "v3"], "params": {"density": 0.5}},
        "merge_method: dare_ties\nbase_model: @base@\nmodels:\n"
        + "".join(
            f"  - model: @{v}@\n    parameters: {{weight: 1.0, density: 0.5}}\n" for v in ("v1", "v2", "v3")
        ),
    ),
    "arcee_fusion": (
        {"method": "arcee_fusion", "base": "base", "inputs": ["v1"]},
        "merge_method: arcee_fusion\nbase_model: @base@\nmodels:\n  - model: @base@\n  - model: @v1@\n",
    ),
}


def _mergekit_yaml(method: str, base: bool, models: list[str], per_model: str = "", params: str = "") -> str:
    text = f"merge_method: {method}\n" + ("base_model: @base@\n" if base else "")
    text += f"parameters: {{{params}}}\n" if params else ""
    text += "models:\n" + "".join(
        f"  - model: @{v}@\n" + (f"    parameters: {{{per_model}}}\n" if per_model else "") for v in models
    )
    return text


# mergekit's same-architecture methods (branchmerge/merge/methods: della, breadcrumbs, sce, karcher,
# nuslerp, multislerp, nearswap), with the parameters users' configs typically set
for _name, _base, _inputs, _per_model, _params in [
    ("della", True, ["v1", "v2", "v3"], {"weight": 1.0, "density": 0.5, "epsilon": 0.15}, {}),
    ("della_linear", True, ["v1", "v2", "v3"], {"weight": 1.0, "density": 0.5, "epsilon": 0.15}, {}),
    ("breadcrumbs", True, ["v1", "v2", "v3"], {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {}),
    ("breadcrumbs_ties", True, ["v1", "v2", "v3"], {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {}),
    ("sce", True, ["v1", "v2", "v3"], {}, {"select_topk": 0.5}),
    ("karcher", False, ["v1", "v2", "v3"], {}, {}),
    ("nuslerp", True, ["v1", "v2"], {"weight": 1.0}, {}),
    ("multislerp", True, ["v1", "v2", "v3"], {"weight": 1.0}, {}),
    ("nearswap", True, ["v1"], {}, {"t": 0.0001}),
    ("model_stock", True, ["v1", "v2", "v3"], {}, {}),
]:
    METHODS[_name] = (
        {
            "method": _name,
            **({"base": "base"} if _base else {}),
            "inputs": _inputs,
            "params": {**_per_model, **_params},
        },
        _mergekit_yaml(
            _name,
            _base,
            _inputs,
            ", ".join(f"{k}: {v}" for k, v in _per_model.items()),
            ", ".join(f"{k}: {v}" for k, v in _params.items()),
        ),
    )


def acm_step(layers: int) -> dict:
    """ACM's merge phase as merge.py runs it after the activation pass: each input's `coef` a pattern
    map of per-layer coefficients (c_iℓ = 1 − NMI, made-up values in (0, 1)) with their mean as the
    default, the form that pass writes."""
    inputs = []
    for i, v in enumerate(("v1", "v2", "v3")):
        per_layer = [round(0.2 + 0.1 * i + 0.5 * (ell / max(1, layers - 1)), 4) for ell in range(layers)]
        coef = {f".layers.{ell}.": c for ell, c in enumerate(per_layer)}
        inputs.append({"model": v, "coef": {**coef, "default": sum(per_layer) / layers}})
    return {"method": "acm", "base": "base", "inputs": inputs, "params": {"lambda_": 1.0}}


METHODS["acm"] = (acm_step(QWEN05["num_hidden_layers"]), None)  # mergekit has no ACM: the floor only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=ROOT / "outputs" / "perf" / "merge")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool, interleaved; the min is reported")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument(
        "--mergekit-venv",
        type=Path,
        default=ROOT / "outputs" / "perf" / "venv-mergekit",
        help="a virtualenv with mergekit's `mergekit-yaml` (built here on first use when missing)",
    )
    ap.add_argument("--out", default="merge_bench.json", help="file name under experiments/perf/results")
    ap.add_argument(
        "--layers", type=int, default=QWEN05["num_hidden_layers"], help="a smaller checkpoint: fewer layers"
    )
    ap.add_argument("--vocab", type=int, default=QWEN05["vocab_size"], help="… and a smaller vocabulary")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = {"num_hidden_layers": args.layers, "vocab_size": args.vocab}
    default = all(QWEN05[k] == v for k, v in shape.items())
    models_dir = args.root / ("models" if default else f"models-L{args.layers}-V{args.vocab}")
    if args.build_only:
        build_models(models_dir, shape=shape)
        return
    # Built in a child: a process's peak RSS survives fork+exec into the children it starts (Linux
    # copies the old address space's high-water mark at exec), so a bench process that had held the
    # 4 GB of models would report them as every tool's peak.
    sizes = ["--layers", str(args.layers), "--vocab", str(args.vocab)]
    subprocess.run([sys.executable, __file__, "--build-only", "--root", str(args.root), *sizes], check=True)
    models = build_models(models_dir, shape=shape)
    paths = {k: str(v) for k, v in models.items()}
    py = None if args.skip_mergekit else mergekit_python(args.mergekit_venv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    for p in models.values():  # warm the page cache: every tool then reads from memory
        for f in p.glob("*.safetensors"):
            with f.open("rb") as fh:
                while fh.read(1 << 24):
                    pass
    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        step, mk_yaml = METHODS[method]
        if method == "acm":
            step = acm_step(args.layers)
        refs = [i if isinstance(i, str) else i["model"] for i in step["inputs"]]
        inputs = ([step["base"]] if "base" in step else []) + refs
        out = args.root / "out"
        runs = {"ours": [], "mergekit": [], "io_floor": []}
        for _ in range(args.repeats):
            for tool in runs:
                subprocess.run(["rm", "-rf", str(out)], check=True)
                os.sync()  # no tool starts with another's dirty pages still being written back
                if tool == "ours":
                    a = {"models": paths, "step": {"name": "m", **step}, "out": str(out)}
                    cmd = [sys.executable, "-c", OURS, json.dumps(a)]
                elif tool == "io_floor":
                    cmd = [sys.executable, "-c", IO_FLOOR, json.dumps([paths[i] for i in inputs]), str(out)]
                else:
                    if py is None or mk_yaml is None:
                        continue
                    cfg = args.root / f"{method}.yml"
                    text = mk_yaml
                    for k, v in paths.items():
                        text = text.replace(f"@{k}@", v)
                    cfg.write_text(text + "dtype: bfloat16\nout_dtype: bfloat16\n")
                    cmd = [str(py.parent / "mergekit-yaml"), str(cfg), str(out), "--lazy-unpickle"]
                runs[tool].append(timed(cmd, env))
        row = {}
        for tool, rs in runs.items():
            if rs:
                row[tool] = {
                    "wall_s": min(r["wall_s"] for r in rs),  # shared machine: the least disturbed run
                    "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                    "wall_s_all": [round(r["wall_s"], 2) for r in rs],
                    "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
                    "load_1m_all": [round(r["load_1m"], 2) for r in rs],
                }
        row["ratios"] = within_repeats(runs)
        results[method] = row
        o, f = row["ours"], row["io_floor"]
        line = f"{method:<14} ours {o['wall_s']:6.1f}s {o['peak_rss_gb']:.2f}GB | floor {f['wall_s']:6.1f}s "
        line += f"(ours/floor {o['wall_s'] / f['wall_s']:.2f}x)"
        if "mergekit" in row:
            m = row["mergekit"]
            line += (
                f" | mergekit {m['wall_s']:6.1f}s {m['peak_rss_gb']:.2f}GB "
                f"(mergekit/ours {m['wall_s'] / o['wall_s']:.1f}x, RSS ours/mergekit "
                f"{o['peak_rss_gb'] / m['peak_rss_gb']:.2f})"
            )
        print(line, flush=True)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if py is not None:
        machine["mergekit"] = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(
        json.dumps(
            {
                "results": results,
                "repeats": args.repeats,
                "shape": {**QWEN05, **shape},
                "machine": machine,
            },
            indent=2,
        )
    )


def within_repeats(runs: dict[str, list[dict]]) -> dict:
    """Ratios of the fastest runs (mergekit/ours, ours/floor) and, run against run, those of each
    repeat (the tools of one repeat ran back to back, under about the same load)."""
    ours, floor, mk = runs["ours"], runs["io_floor"], runs["mergekit"]
    best = {t: min(r["wall_s"] for r in rs) for t, rs in runs.items() if rs}
    out = {"ours/floor": best["ours"] / best["io_floor"]}
    out["ours/floor_per_repeat"] = [round(o["wall_s"] / f["wall_s"], 2) for o, f in zip(ours, floor)]
    if mk:
        out["mergekit/ours"] = best["mergekit"] / best["ours"]
        out["mergekit/ours_per_repeat"] = [round(m["wall_s"] / o["wall_s"], 2) for m, o in zip(mk, ours)]
    return out


if __name__ == "__main__":
    main()
