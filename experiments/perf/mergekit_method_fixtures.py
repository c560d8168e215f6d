"""Record mergekit's outputs for its same-architecture merge methods on small tensors: the fixtures that
tests/unit/test_merge_methods_mergekit.py holds our methods to.

    outputs/perf/venv-mergekit/bin/python experiments/perf/mergekit_method_fixtures.py

Runs in mergekit's own virtualenv (made by `make bench-merge`; no branchmerge import) and calls
mergekit's in-memory API, `mergekit.merge_methods.merge_tensors(tensors, method, parameters=…,
base_index=…)`, in float32. Writes tests/fixtures/mergekit_methods/:
  cases.json              each case: method, parameters in our names (per-model ones as lists in input
                          order), whether a base leads the inputs, the shapes, mergekit's version
  tensors.safetensors     "<case>/base", "<case>/<i>" (inputs), "<case>/out" (mergekit's output)
Deterministic methods are recorded once. DELLA draws its drops from torch's global generator, so it is
recorded as a distribution over RUNS seeds: "<case>/keep" (how often the entry of each magnitude rank
within its row was kept, one model, base 0), "<case>/scale" (the L1 rescale factor of each run), and
"<case>/mean", "<case>/std" (per-entry mean and standard deviation of the merged output).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch
from mergekit.merge_methods import merge_tensors
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "mergekit_methods"
RUNS = 300  # seeds per randomised case
PER_MODEL = ("weight", "density", "gamma", "epsilon")
WEIGHTED = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "nuslerp", "multislerp")

# name: (method, number of models, base?, shape, parameters in our names)
CASES = {
    "breadcrumbs": (
        "breadcrumbs",
        3,
        True,
        (12, 20),
        {"weight": [1.0, 0.5, 0.8], "density": [0.6, 0.7, 0.5]},
    ),
    "breadcrumbs_rescaled": (
        "breadcrumbs",
        2,
        True,
        (12, 20),
        {"density": [0.6, 0.5], "gamma": [0.1, 0.2], "rescale": True, "normalize": True, "lambda_": 0.9},
    ),
    "breadcrumbs_1d": ("breadcrumbs", 2, True, (40,), {"density": [0.5, 0.9], "gamma": [0.2, 0.2]}),
    "breadcrumbs_ties": (
        "breadcrumbs_ties",
        3,
        True,
        (12, 20),
        {"weight": [1.0, -0.4, 0.7], "density": [0.7, 0.6, 0.8], "gamma": [0.05, 0.1, 0.05]},
    ),
    "breadcrumbs_ties_normalized": (
        "breadcrumbs_ties",
        3,
        True,
        (12, 20),
        {"density": [0.7, 0.6, 0.8], "normalize": True},
    ),
    "della_dense": ("della", 3, True, (12, 20), {"weight": [1.0, 0.5, -0.3], "lambda_": 1.2}),
    "della_linear_dense": ("della_linear", 2, True, (12, 20), {"weight": [0.6, 0.9], "normalize": True}),
    "sce": ("sce", 3, True, (12, 20), {}),
    "sce_topk": ("sce", 3, True, (12, 20), {"select_topk": 0.4}),
    "sce_topk_1d": ("sce", 2, True, (40,), {"select_topk": 0.7}),
    "sce_small_deltas": ("sce", 3, True, (12, 20), {"select_topk": 0.5}),  # Σ mean τ² < 1e-6: η = 1/N
    "karcher": ("karcher", 3, False, (12, 20), {}),
    "karcher_two": ("karcher", 2, False, (12, 20), {"max_iter": 3, "tol": 1e-6}),
    "karcher_1d": ("karcher", 3, False, (40,), {}),
    "nuslerp": ("nuslerp", 2, False, (12, 20), {"weight": [0.3, 0.7]}),
    "nuslerp_base": ("nuslerp", 2, True, (12, 20), {"weight": [1.0, 0.5]}),
    "nuslerp_rows": ("nuslerp", 2, True, (12, 20), {"weight": [0.4, 0.6], "nuslerp_flatten": False}),
    "nuslerp_columns": (
        "nuslerp",
        2,
        False,
        (12, 20),
        {"weight": [0.4, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    "nuslerp_1d": ("nuslerp", 2, False, (40,), {"weight": [0.2, 0.8], "nuslerp_flatten": False}),
    "multislerp": ("multislerp", 3, False, (12, 20), {"weight": [1.0, 2.0, 0.5]}),
    "multislerp_base": ("multislerp", 3, True, (12, 20), {"weight": [0.2, 0.3, 0.5]}),
    "multislerp_raw_weights": (
        "multislerp",
        2,
        True,
        (40,),
        {"weight": [0.7, 0.6], "normalize_weights": False},
    ),
    "nearswap": ("nearswap", 1, True, (12, 20), {"t": 0.05}),
}
RANDOM = {
    "della_linear_keep": ("della_linear", 1, True, (64, 50), {"density": [0.5], "epsilon": [0.2]}),
    "della_mean": (
        "della",
        2,
        True,
        (16, 24),
        {"weight": [1.0, 0.7], "density": [0.6, 0.4], "epsilon": [0.2, 0.3]},
    ),
    "della_linear_mean": (
        "della_linear",
        2,
        True,
        (16, 24),
        {"weight": [1.0, 0.5], "density": [0.5, 0.7], "epsilon": [0.1, 0.25], "lambda_": 0.8},
    ),
}


def inputs(case: str, n: int, base: bool, shape) -> list[torch.Tensor]:
    """[base,] models: the base ~ N(0, 1), models = base + N(0, 0.3²) (0.3·10⁻³ for small deltas);
    the keep-rate case has base 0 so that the output is the masked, rescaled model itself."""
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    b = torch.zeros(shape) if case == "della_linear_keep" else torch.randn(shape, generator=g)
    scale = 3e-4 if "small" in case else 0.3
    models = [b + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return ([b] if base else []) + models


def mergekit_params(method: str, params: dict, n: int, base: bool) -> dict:
    """Our names -> mergekit's: `lambda_` -> `lambda`, per-model lists -> {input id: value}; our default
    weight 1.0 stated (mergekit requires it)."""
    out = {}
    if method in WEIGHTED:
        params = {"weight": [1.0] * n, **params}
    for k, v in params.items():
        k = "lambda" if k == "lambda_" else k
        out[k] = {i + int(base): x for i, x in enumerate(v)} if k in PER_MODEL else v
    return out


def run(method: str, ins: list[torch.Tensor], params: dict, n: int, base: bool) -> torch.Tensor:
    return merge_tensors(
        ins,
        method,
        parameters=mergekit_params(method, params, n, base),
        base_index=0 if base else None,
        dtype=torch.float32,
    )


def keep_by_rank(out: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(kept fraction per ascending rank of |model| within each row, the rescale factor) of one run."""
    kept = out != 0
    ranks = model.abs().argsort(dim=1).argsort(dim=1)
    per_rank = torch.zeros(model.shape[1]).index_add_(0, ranks[kept], torch.ones(int(kept.sum())))
    return per_rank / model.shape[0], float((out[kept] / model[kept]).mean())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"mergekit": version("mergekit"), "torch": torch.__version__, "runs": RUNS, "cases": {}}
    for case, (method, n, base, shape, params) in {**CASES, **RANDOM}.items():
        ins = inputs(case, n, base, shape)
        if base:
            tensors[f"{case}/base"] = ins[0]
        for i, t in enumerate(ins[int(base) :]):
            tensors[f"{case}/{i}"] = t
        manifest["cases"][case] = {"method": method, "models": n, "base": base, "params": params}
        if case in CASES:
            tensors[f"{case}/out"] = run(method, ins, params, n, base)
            continue
        outs = []
        for seed in range(RUNS):
            torch.manual_seed(seed)
            outs.append(run(method, ins, params, n, base))
        if case == "della_linear_keep":
            per_run = [keep_by_rank(o, ins[1]) for o in outs]
            tensors[f"{case}/keep"] = torch.stack([k for k, _ in per_run]).mean(0)
            tensors[f"{case}/scale"] = torch.tensor([s for _, s in per_run])
        else:
            stacked = torch.stack(outs)
            tensors[f"{case}/mean"] = stacked.mean(0)
            tensors[f"{case}/std"] = stacked.std(0)
        print(case, "recorded over", RUNS, "seeds", flush=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "tensors.safetensors")
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(tensors)} tensors for {len(manifest['cases'])} cases to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
