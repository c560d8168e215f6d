"""mergekit's same-architecture methods (DELLA, Model Breadcrumbs, SCE, Karcher, NuSLERP, Multi-SLERP,
NearSwap): values worked out by hand on tiny tensors, dense references written out below on tensors of
several blocks, and parity with mergekit's own outputs recorded by
experiments/perf/mergekit_method_fixtures.py (tests/fixtures/mergekit_methods/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from branchmerge.merge.methods import get_method

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mergekit_methods"
MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
TENSORS = load_file(FIXTURES / "tensors.safetensors")
DETERMINISTIC = sorted(c for c in MANIFEST["cases"] if f"{c}/out" in TENSORS)
R2 = math.sqrt(2)


def call(name, tensors, base=None, **params):
    return get_method(name)(tensors, base, **{"tensor_name": "w", **params})


def fixture(case: str) -> tuple[dict, list[torch.Tensor], torch.Tensor | None]:
    c = MANIFEST["cases"][case]
    return c, [TENSORS[f"{case}/{i}"] for i in range(c["models"])], TENSORS.get(f"{case}/base")


# ---------------------------------------------------------------- parity with mergekit's recorded outputs


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(case):
    """Our method on mergekit's inputs and parameters gives mergekit's output: measured max difference
    ≤ 4e-7 (fp32 rounding) on every case; asserted ≤ 1e-5 relative to the output's largest entry
    (the acceptance bound is 1e-2). Planted bugs this caught: nuslerp_row_wise slerping rows instead of
    columns; SCE without the uniform weights when Σ mean τ² < 1e-6; Karcher scaled by the summed
    norm; NearSwap's s applied to the base; the Breadcrumbs band one rank too wide."""
    c, models, base = fixture(case)
    ours = get_method(c["method"])(models, base, tensor_name=case, **c["params"])
    want = TENSORS[f"{case}/out"]
    assert ours.shape == want.shape
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max(), case


def test_fixtures_cover_every_deterministic_method():
    methods = {MANIFEST["cases"][c]["method"] for c in DETERMINISTIC}
    assert methods >= {
        "breadcrumbs",
        "breadcrumbs_ties",
        "sce",
        "karcher",
        "nuslerp",
        "multislerp",
        "nearswap",
    }
    assert {"della", "della_linear"} <= methods  # their deterministic part (density 1: elect and fuse)


def _keep_by_rank(out: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    kept = out != 0
    ranks = model.abs().argsort(dim=1).argsort(dim=1)
    return (
        torch.zeros(model.shape[1]).index_add_(0, ranks[kept], torch.ones(int(kept.sum()))) / model.shape[0]
    )


def test_della_keep_rates_and_rescale_match_mergekit_in_distribution():
    """MAGPRUNE keeps the entry of ascending rank r in its row with p = density − ε + 2ε·r/(c−1): our
    per-rank keep rates over 300 seeds match mergekit's and the formula within 5 standard errors, and
    our L1 rescale factors have mergekit's mean. Guards against reversed ranks (planted: argsort
    descending, so the largest entries were dropped most: rates off by up to 0.4)."""
    c, (model,), base = fixture("della_linear_keep")
    runs, rows, cols = MANIFEST["runs"], *model.shape
    outs = [call("della_linear", [model], base, seed=s, **c["params"]) for s in range(runs)]
    ours = torch.stack([_keep_by_rank(o, model) for o in outs]).mean(0)
    theory = 0.3 + 0.4 * torch.arange(cols) / (cols - 1)
    se = (theory * (1 - theory) / (rows * runs)).sqrt()
    assert ((ours - TENSORS["della_linear_keep/keep"]).abs() < 5 * R2 * se).all()
    assert ((ours - theory).abs() < 5 * se).all()
    scales = torch.tensor([(o[o != 0] / model[o != 0]).mean().item() for o in outs])
    for o, s in zip(outs, scales):  # the realised L1 ratio of each draw, as mergekit rescales
        assert math.isclose(
            model.abs().sum().item() / (o != 0).mul(model).abs().sum().item(), s, rel_tol=1e-5
        )
    theirs = TENSORS["della_linear_keep/scale"]
    assert abs(scales.mean() - theirs.mean()) < 5 * math.sqrt((scales.var() + theirs.var()) / runs)


@pytest.mark.parametrize("case", ["della_mean", "della_linear_mean"])
def test_della_outputs_match_mergekit_in_distribution(case):
    """Per entry, the mean of our merged output over 300 seeds equals mergekit's within sampling error
    (mean z² ≈ 1, no |z| > 5) and the spread matches (std ratio within 10%). Guards against a scale
    applied per entry (planted: a fixed 1/density instead of the realised L1 ratio)."""
    c, models, base = fixture(case)
    runs = MANIFEST["runs"]
    outs = torch.stack([call(c["method"], models, base, seed=s, **c["params"]) for s in range(runs)])
    mean, std = TENSORS[f"{case}/mean"], TENSORS[f"{case}/std"]
    z = (outs.mean(0) - mean) / ((outs.std(0) ** 2 + std**2) / runs).sqrt().clamp_min(1e-12)
    assert (z**2).mean() < 1.5 and z.abs().max() < 5
    assert abs((outs.std(0).mean() / std.mean()).item() - 1) < 0.1


# ---------------------------------------------------------------- Model Breadcrumbs

X = torch.tensor([[0.5, -3.0, 1.0, 2.0, -0.2], [4.0, -1.5, 0.1, 2.5, -5.0]])  # |X| ranks: all distinct
Z = torch.zeros(2, 5)


def test_breadcrumbs_by_hand():
    """n = 10, density 0.5 → keep 5; gamma 0.2 → drop the 2 largest (5, 4), so the 3 smallest go too."""
    out = call("breadcrumbs", [X], Z, density=[0.5], gamma=[0.2])
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 1.0, 2.0, 0.0], [0.0, -1.5, 0.0, 2.5, 0.0]]))
    # rescale: ‖Δ‖₁ = 19.8, kept 10 → ×1.98; weight and λ multiply
    scaled = call("breadcrumbs", [X], Z, density=[0.5], gamma=[0.2], rescale=True, weight=[2.0], lambda_=0.5)
    assert torch.allclose(scaled, 1.98 * out)
    # gamma 0.6 would leave fewer than 5: mergekit then keeps the 5 smallest
    small = call("breadcrumbs", [X], Z, density=[0.5], gamma=[0.6])
    assert torch.equal(small, torch.tensor([[0.5, 0.0, 1.0, 0.0, -0.2], [0.0, -1.5, 0.1, 0.0, 0.0]]))
    assert torch.equal(call("breadcrumbs", [X], Z, density=[1.0], gamma=[0.5]), X)  # density 1: untouched


def test_breadcrumbs_ties_by_hand():
    """Election as mergekit's: + where Σ_i w_iΔ_i ≥ 0 (a zero sum elects +, so the positive entry stays;
    planted bug caught: `>` instead of `≥`, which erased it)."""
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.5, 1.0])
    d2 = torch.tensor([-2.0, 1.0, 1.0, 0.4, -1.0])
    z = torch.zeros(5)
    out = call("breadcrumbs_ties", [d1, d2], z, normalize=True)
    assert torch.allclose(out, torch.tensor([-2.0, -2.0, 2.0, 0.45, 1.0]))
    plain = call("breadcrumbs_ties", [d1, d2], z, lambda_=2.0)  # normalize defaults to false (mergekit)
    assert torch.allclose(plain, 2 * torch.tensor([-2.0, -2.0, 4.0, 0.9, 1.0]))


def dense_breadcrumbs(base, models, density, gamma, weight, consensus):
    """Breadcrumbs from a full sort of each |Δ_i| (the reference for the sampled thresholds)."""
    ds = []
    for m, d, g, w in zip(models, density, gamma, weight):
        delta = (m - base).reshape(-1)
        n = delta.numel()
        keep, top = int(d * n), int(g * n)
        bottom = max(0, n - keep - top)
        order = delta.abs().argsort()
        mask = torch.zeros(n)
        mask[order[bottom : bottom + keep]] = 1
        ds.append(w * delta * mask)
    ds = torch.stack(ds)
    if consensus:
        elected = torch.where(ds.sum(0) >= 0, 1.0, -1.0)
        ds = ds * (ds.sign() == elected)
    return base + ds.sum(0).reshape(base.shape)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_a_full_sort_on_several_blocks(name):
    """300 000 entries: the thresholds come from the sampled exact selection, not a sort. Guards against
    an off-by-one in the band (planted: hi = the (n−b−t)-th largest: one more large entry kept)."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(600, 500, generator=g)
    models = [base + torch.randn(600, 500, generator=g) for _ in range(2)]
    p = dict(density=[0.3, 0.6], gamma=[0.05, 0.2], weight=[1.0, 0.6])
    ours = call(name, models, base, **p)
    ref = dense_breadcrumbs(base, models, p["density"], p["gamma"], p["weight"], name.endswith("ties"))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_breadcrumbs_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        call("breadcrumbs", [X], Z, density=[0.5], gamma=[1.5])


# ---------------------------------------------------------------- DELLA


def test_della_drop_probabilities_by_hand():
    """Rows [0.1, −3, 2]: ranks 0, 2, 1 → p = density − ε, density + ε, density (0.2, 0.8, 0.5 at
    density 0.5, ε 0.3); a one-column tensor keeps with p = density. Kept entries are untouched without
    rescale and scaled by the realised ‖Δ‖₁ / ‖m ⊙ Δ‖₁ with it."""
    rows = torch.tensor([[0.1, -3.0, 2.0]]).repeat(4000, 1)
    zero = torch.zeros_like(rows)
    p = dict(density=[0.5], epsilon=[0.3], seed=3)
    out = call("della_linear", [rows], zero, rescale=False, **p)
    kept = out != 0
    assert torch.equal(out[kept], rows[kept])
    assert torch.allclose(kept.float().mean(0), torch.tensor([0.2, 0.8, 0.5]), atol=0.03)
    scaled = call("della_linear", [rows], zero, **p)
    assert torch.equal(scaled != 0, kept)  # the same seeded draws
    ratio = rows.abs().sum() / (rows * kept).abs().sum()
    assert torch.allclose(scaled[kept], rows[kept] * ratio)
    col = call(
        "della_linear", [torch.ones(4000, 1)], torch.zeros(4000, 1), rescale=False, density=[0.3], seed=1
    )
    assert abs((col != 0).float().mean().item() - 0.3) < 0.03


def test_della_is_seeded_per_tensor_and_model():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(50, 60, generator=g)
    models = [base + torch.randn(50, 60, generator=g) for _ in range(2)]
    p = dict(density=[0.5, 0.5], seed=1)
    out = call("della", models, base, **p)
    assert torch.equal(out, call("della", models, base, **p))
    assert not torch.equal(out, call("della", models, base, **{**p, "seed": 2}))
    assert not torch.equal(out, call("della", models, base, **p, tensor_name="v"))


def test_della_at_density_one_elects_and_normalises_by_hand():
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    d2 = torch.tensor([-2.0, 1.0, 1.0, 0.4])
    out = call("della", [d1, d2], torch.zeros(4), lambda_=0.5)
    assert torch.allclose(out, 0.5 * torch.tensor([-2.0, -2.0, 2.0, 0.45]))
    linear = call("della_linear", [d1, d2], torch.zeros(4), weight=[1.0, 3.0], normalize=True)
    assert torch.allclose(linear, (d1 + 3 * d2) / 4)


def test_della_rejects_epsilon_outside_the_unit_interval():
    with pytest.raises(ValueError, match="density ± epsilon must lie in"):
        call("della", [X], Z, density=[0.1], epsilon=[0.15])


# ---------------------------------------------------------------- SCE


def test_sce_by_hand():
    """τ1 = [1, 2, −1, 0], τ2 = [3, 2, 2, 0]: η ∝ mean τ² = 1.5, 4.25; all elected + (0 counts as +);
    τ1's −1 is erased; the last entry has no agreeing model → 0. select_topk 0.5: variances
    [1, 0, 2.25, 0], k = ⌊0.5·2⌋ = 1 keeps entry 2 only, then η ∝ 1/4, 1."""
    t1, t2 = torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([3.0, 2.0, 2.0, 0.0])
    z = torch.zeros(4)
    e1, e2 = 1.5 / 5.75, 4.25 / 5.75
    assert torch.allclose(call("sce", [t1, t2], z), torch.tensor([e1 * 1 + e2 * 3, 2.0, 2.0, 0.0]))
    assert torch.allclose(call("sce", [t1, t2], z, select_topk=0.5), torch.tensor([0.0, 0.0, 2.0, 0.0]))


def dense_sce(base, models, topk):
    taus = torch.stack([m - base for m in models]).reshape(len(models), -1)
    if topk < 1:
        var = taus.var(0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        mask = torch.zeros_like(var)
        mask[var.topk(k).indices] = 1
        taus = taus * mask
    eta = taus.pow(2).mean(1)
    eta = eta / eta.sum() if eta.sum() >= 1e-6 else torch.full_like(eta, 1 / len(models))
    erase = taus.sign() == torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    w = eta[:, None] * erase
    return base + ((taus * w).sum(0) / w.sum(0).clamp_min(1e-6)).reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_matches_a_dense_reference_on_several_blocks(topk):
    """Guards against the variance threshold being taken over the wrong set (planted: k from all
    entries instead of the nonzero-variance ones: 30% of 300 000 vs of 150 000 kept)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(600, 500, generator=g)
    models = [base + 0.1 * torch.randn(600, 500, generator=g) for _ in range(3)]
    for m in models:  # half the entries have zero variance: k counts only the other half
        m[:300] = base[:300]
    assert torch.allclose(
        call("sce", models, base, select_topk=topk), dense_sce(base, models, topk), atol=1e-5
    )


# ---------------------------------------------------------------- Karcher mean


def test_karcher_by_hand():
    """Orthogonal directions of norms 1 and 3: the spherical mean is their bisector, scaled by the
    mean norm 2 → √2·(1, 1). Guards against scaling by the summed norm (planted: W = 2√2·(1, 1))."""
    out = call("karcher", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])])
    assert torch.allclose(out, torch.tensor([R2, R2]))
    x = torch.randn(3, 4)
    assert torch.equal(call("karcher", [x]), x)  # one model: itself


def dense_karcher(xs, max_iter=10, tol=1e-5):
    """The Karcher iteration on the full vectors (float64)."""
    xs = [x.double().reshape(-1) for x in xs]
    norms = [x.norm() for x in xs]
    units = [x / n for x, n in zip(xs, norms)]
    mu = sum(units) / len(units)
    mu = mu / mu.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for u in units:
            d = (mu @ u).clamp(-1, 1)
            phi = torch.arccos(d)
            if phi >= tol:
                tangent += phi / torch.sin(phi) * (u - d * mu) / len(units)
        tn = tangent.norm()
        if tn < tol:
            break
        mu = torch.cos(tn) * mu + torch.sin(tn) * tangent / tn
        mu = mu / mu.norm()
    return sum(norms) / len(norms) * mu


def test_karcher_matches_the_iteration_on_full_vectors():
    """300 000 entries (two blocks): the Gram-matrix iteration equals the one on full vectors.
    Guards against a Gram matrix summed over one block only (planted: the first block's only)."""
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(600, 500, generator=g) + 0.5 * i for i in range(3)]
    ours = call("karcher", xs)
    assert torch.allclose(ours.double().reshape(-1), dense_karcher(xs), atol=1e-5)
    assert torch.allclose(
        call("karcher", xs, max_iter=1), dense_karcher(xs, max_iter=1).reshape(600, 500).float(), atol=1e-5
    )


# The engine's allocator settings (`_reuse_freed_memory`), then one method's stats over bf16 tensors of
# 16 M entries (64 blocks), a base and three models; prints the growth of the heap (RssAnon) in bytes.
HEAP_SCRIPT = r"""
import sys, torch
from branchmerge.merge.engine import _reuse_freed_memory
from branchmerge.merge.executor import Context
from branchmerge.merge.methods import get_method
def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
m = get_method(sys.argv[1])
g = torch.Generator().manual_seed(0)
base, *xs = [torch.randn(1 << 14, 1 << 10, generator=g).to(torch.bfloat16) for _ in range(4)]
xs = xs[: m.max_models or 3]
params = {p: [v] * len(xs) for p, v in m.model_params.items()} | m.global_params
_reuse_freed_memory()
ctx = Context(view=m.view, models=xs, base=base if m.needs_base else None, params=params, dtype=torch.bfloat16)
before = anon()
m.stats(ctx)
print(anon() - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["karcher", "model_stock"])
def test_stats_heap_growth_is_a_few_blocks_not_one_per_block(name):
    """A stats pass over a 16 M-entry tensor (64 blocks) grows the heap by a few blocks' float64
    temporaries (6 MB each), not by one per block. Guards against per-block results kept as tensors
    until the sum: each pins the heap hole its block's temporaries just freed (planted: Karcher's Gram
    pass as `torch.stack(ctx.map(part)).sum(0)`, 133 MB; Model Stock's products concatenated after the
    pass, 141 MB). On the 118 M-parameter benchmark checkpoint that made Karcher's peak RSS 1.1 GB
    against ~0.6 GB for the others."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", HEAP_SCRIPT, name], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = int(proc.stdout.strip().splitlines()[-1])
    assert growth < 8 * 6 * 2**20, growth / 2**20


# ---------------------------------------------------------------- NuSLERP


def test_nuslerp_by_hand():
    """a = [[1, 0], [0, 2]], b = [[0, 1], [0, 2]], equal weights (t = 0.5):
    whole tensor: cos Ω = 4/5; rows: orthogonal → (a+b)/√2, identical → a; columns: (1,0) vs a zero
    column → Ω = π/2, (0,2) vs (1,2): cos Ω = 2/√5."""
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    om = math.acos(0.8)
    c = math.sin(om / 2) / math.sin(om)
    assert torch.allclose(call("nuslerp", [a, b]), c * (a + b))
    rows = call("nuslerp", [a, b], nuslerp_flatten=False)
    assert torch.allclose(rows, torch.tensor([[1 / R2, 1 / R2], [0.0, 2.0]]))
    om1 = math.acos(2 / math.sqrt(5))
    c1 = math.sin(om1 / 2) / math.sin(om1)
    cols = call("nuslerp", [a, b], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert torch.allclose(cols, torch.tensor([[1 / R2, c1], [0.0, 4 * c1]]))
    # t = w_2 / (w_1 + w_2): weight 0 on b returns a; with a base, the task vectors are slerped
    assert torch.allclose(call("nuslerp", [a, b], weight=[1.0, 0.0]), a)
    assert torch.allclose(call("nuslerp", [a + 1, b + 1], torch.ones(2, 2)), 1 + c * (a + b))


def dense_nuslerp(a, b, t, dim):
    """SLERP of the vectors along `dim` (None: the whole tensor), in float64."""
    a, b = a.double(), b.double()
    if dim is None:
        return dense_nuslerp(a.reshape(1, -1), b.reshape(1, -1), t, 1).reshape(a.shape)
    na, nb = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    omega = torch.arccos(((a / na) * (b / nb)).sum(dim, keepdim=True).clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@pytest.mark.parametrize("mode", ["tensor", "rows", "columns"])
def test_nuslerp_matches_the_dense_formula_on_several_blocks(mode):
    """700 × 600 (two blocks of rows). Guards against column sums taken over one block (planted: the
    first block's only)."""
    g = torch.Generator().manual_seed(9)
    base, a, b = (torch.randn(700, 600, generator=g) for _ in range(3))
    p = {"tensor": {}, "rows": {"nuslerp_flatten": False}}.get(
        mode, {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    )
    ours = call("nuslerp", [a, b], base, weight=[0.3, 0.7], **p)
    ref = base + dense_nuslerp(a - base, b - base, 0.7, {"tensor": None, "rows": 1, "columns": 0}[mode])
    assert torch.allclose(ours.double(), ref, atol=1e-5)


def test_nuslerp_row_wise_needs_a_matrix():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="nuslerp_row_wise takes matrices only"):
        call("nuslerp", [x, x], nuslerp_flatten=False, nuslerp_row_wise=True)


# ---------------------------------------------------------------- Multi-SLERP


def test_multislerp_by_hand():
    """Orthogonal x1, x2 of norm 2, equal weights: μ is the bisector, the tangent vectors cancel,
    W = 2·μ = (√2, √2); with a base the task vectors are interpolated; one model is returned as is."""
    out = call("multislerp", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])])
    assert torch.allclose(out, torch.tensor([R2, R2]))
    one = torch.ones(2)
    assert torch.allclose(
        call("multislerp", [one + torch.tensor([2.0, 0.0]), one + torch.tensor([0.0, 2.0])], one), one + R2
    )
    x = torch.randn(5)
    assert torch.equal(call("multislerp", [x]), x)


def dense_multislerp(xs, w, base=None, eps=1e-8):
    x = torch.stack([t.double().reshape(-1) for t in xs])
    if base is not None:
        x = x - base.double().reshape(-1)
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum()
    norms = x.norm(dim=1, keepdim=True)
    u = x / (norms + eps)
    mu = (w[:, None] * u).sum(0)
    mu = mu / mu.norm()
    t = (w[:, None] * (u - (u @ mu)[:, None] * mu)).sum(0)
    tn = t.norm() + eps
    out = (w * norms[:, 0]).sum() * (mu * torch.cos(tn) + t * torch.sin(tn) / tn)
    return out if base is None else out + base.double().reshape(-1)


def test_multislerp_matches_the_dense_formula_on_several_blocks():
    """Guards against an unweighted norm (planted: mean_i ‖x_i‖ instead of Σ_i w_i ‖x_i‖)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(600, 500, generator=g)
    xs = [base + torch.randn(600, 500, generator=g) + 0.3 * i for i in range(3)]
    w = [0.5, 1.0, 2.0]
    ours = call("multislerp", xs, base, weight=w)
    assert torch.allclose(ours.double().reshape(-1), dense_multislerp(xs, w, base), atol=1e-5)


def test_multislerp_antipodal_inputs_are_a_clear_error():
    x = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="weighted mean direction .* is zero"):
        call("multislerp", [x, -x, 2 * x], weight=[1.0, 2.0, 1.0])
    assert torch.allclose(call("multislerp", [x, -x]), torch.zeros(2))  # two models: the linear fallback


# ---------------------------------------------------------------- NearSwap


def test_nearswap_by_hand():
    """|B − θ| = 5e-5, 1e-3, 2e-4 at t = 1e-4 → s = 1, 0.1, 0.5. Guards against s applied to the base
    (planted: W = s·B + (1−s)·θ)."""
    base = torch.zeros(3)
    model = torch.tensor([5e-5, 1e-3, -2e-4])
    assert torch.allclose(call("nearswap", [model], base), torch.tensor([5e-5, 1e-4, -1e-4]))
    assert torch.equal(call("nearswap", [model], base, t=1.0), model)  # everything within t


# ---------------------------------------------------------------- through the engine (pool, blocks, files)

ENGINE_STEPS = {
    "della": {"base": "base", "inputs": ["a", "b", "c"], "params": {"density": 0.5}},
    "della_linear": {"base": "base", "inputs": ["a", "b"], "params": {"density": 0.4, "epsilon": 0.2}},
    "breadcrumbs": {"base": "base", "inputs": ["a", "b"], "params": {"density": 0.6, "gamma": 0.1}},
    "breadcrumbs_ties": {
        "base": "base",
        "inputs": ["a", "b", "c"],
        "params": {"density": 0.7, "rescale": True},
    },
    "sce": {"base": "base", "inputs": ["a", "b", "c"], "params": {"select_topk": 0.3}},
    "karcher": {"inputs": ["a", "b", "c"]},
    "nuslerp": {
        "base": "base",
        "inputs": ["a", "b"],
        "params": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "multislerp": {"base": "base", "inputs": ["a", "b", "c"]},
    "nearswap": {"base": "base", "inputs": ["a"], "params": {"t": 0.05}},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A base and three variants: a 700 × 600 matrix (several blocks in either view) and a bias, bf16."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ckpts")
    g = torch.Generator().manual_seed(8)
    base = {"w.weight": torch.randn(700, 600, generator=g), "w.bias": torch.randn(600, generator=g)}
    out = {}
    for k, name in enumerate(["base", "a", "b", "c"]):
        sd = {n: (t + 0.1 * k * torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": "toy"}))
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", sorted(ENGINE_STEPS))
def test_the_engine_gives_the_in_memory_result(checkpoints, tmp_path, name):
    """Through merge(): the pool runs the stats passes and the blocks on several threads, bf16 files in
    and out; the result is the in-memory call's, bit for bit (seeded draws do not depend on threads).
    Guards against draws that depend on the thread (planted: DELLA's keep draws from torch's global
    generator)."""
    from safetensors.torch import load_file as load

    from branchmerge.merge.engine import MergeOptions, merge
    from branchmerge.merge.recipe import parse_steps

    step = {"name": "m", "method": name, **ENGINE_STEPS[name]}
    opts = MergeOptions(progress=False, chunk_elements=1000)  # every tensor block-parallel on the pool
    merge(checkpoints, parse_steps([step], set(checkpoints)), tmp_path / "o", opts)
    got = load(tmp_path / "o" / "model.safetensors")
    m = get_method(name)
    params = {p: [v] * len(step["inputs"]) for p, v in m.model_params.items()}
    params.update(m.global_params)
    params.update(step.get("params", {}))
    for p in m.model_params:
        if not isinstance(params[p], list):
            params[p] = [params[p]] * len(step["inputs"])
    for tensor, value in got.items():
        ins = [load(checkpoints[i] / "model.safetensors")[tensor] for i in step["inputs"]]
        base = load(checkpoints["base"] / "model.safetensors")[tensor] if "base" in step else None
        want = m(ins, base, tensor_name=tensor, dtype=torch.float32, out_dtype=torch.bfloat16, **params)
        assert torch.equal(value, want), (name, tensor)
