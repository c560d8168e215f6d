"""Merge methods on 2x3 tensors against values worked out by hand, plus properties."""

import math

import pytest
import torch

from branchmerge.merge.executor import row_spans, tensor_seed
from branchmerge.merge.methods import METHODS, get_method
from branchmerge.merge.methods.select import SAMPLE, Subsample, kth_largest_of, quantiles

A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
B = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
ONES = torch.ones(2, 3)


def call(name, tensors, base=None, **params):
    return get_method(name)(tensors, base, **params)


def test_linear_by_hand():
    out = call("linear", [A, B], weight=[1.0, 3.0], normalize=True)
    assert torch.allclose(out, torch.tensor([[2.5, 2.0, 1.5], [1.0, 2.0, 3.0]]))
    assert torch.allclose(call("linear", [A, B], weight=[1.0, 3.0], normalize=False), A + 3 * B)


def test_task_arithmetic_by_hand():
    out = call("task_arithmetic", [A, B], ONES, weight=[1.0, 0.5], lambda_=1.0)
    assert torch.allclose(out, torch.tensor([[2.0, 2.5, 3.0], [3.5, 5.0, 6.5]]))


def test_ties_by_hand():
    d1 = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    d2 = torch.tensor([[2.0, -1.0, 3.0], [1.0, -4.0, 0.5]])
    zero = torch.zeros(2, 3)
    out = call("ties", [d1, d2], zero, weight=[1.0, 1.0], density=[0.5, 0.5])
    # trim: d1 -> [[0,0,0],[-4,5,-6]], d2 -> [[2,0,3],[0,-4,0]]; signs [[+,0,+],[-,+,-]]; -4 of d2 disagrees
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 3.0], [-4.0, 5.0, -6.0]]))


def test_slerp_by_hand():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    h = math.sqrt(0.5)
    assert torch.allclose(
        call("slerp", [a, b], t=0.5), torch.tensor([[h, h, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6
    )
    assert torch.allclose(call("slerp", [a, b], t=0.0), a) and torch.allclose(call("slerp", [a, b], t=1.0), b)


def test_arcee_fusion_by_hand():
    # row 1: P = softmax(1,2,3), Q uniform -> κ = 0.26621; row 2 is uniform -> κ = 0
    # S = [[0.266, 0.532, 0.799], [0, 0, 0]]; sorted: Q1 = 0, median = 0, Q3 = 0.266 -> τ = 0.399
    r = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    out = call("arcee_fusion", [r], torch.zeros(2, 3))
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    # a larger multiplier keeps fewer coordinates
    assert torch.equal(
        call("arcee_fusion", [r], torch.zeros(2, 3), k=2.5), torch.tensor([[0.0, 0.0, 3.0], [0.0] * 3])
    )


def test_fisher_by_hand():
    fa = torch.tensor([[1.0, 0.0, 1.0], [3.0, 1.0, 0.0]])
    fb = torch.tensor([[1.0, 1.0, 0.0], [1.0, 3.0, 0.0]])
    out = call("fisher", [A, B], weight=[1.0, 1.0], importance=[fa, fb])
    assert torch.allclose(
        out, torch.tensor([[2.0, 2.0, 3.0], [3.0, 2.0, 4.0]])
    )  # last: no mass -> plain mean


def test_model_stock_by_hand():
    # Δ1 = [[1,1,0],[2,0,0]], Δ2 = [[1,0,1],[0,2,0]]: whole tensors ⟨Δ1,Δ2⟩ = 1, ‖Δ1‖‖Δ2‖ = 6, cos = 1/6,
    # t = 2·(1/6) / (1 + 1/6) = 2/7; per row: cos = 1/2 (t = 2/3) and cos = 0 (t = 0)
    t1 = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    t2 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mean = (t1 + t2) / 2
    zero = torch.zeros(2, 3)
    assert torch.allclose(call("model_stock", [t1, t2], zero), 2 / 7 * mean)
    per_row = torch.tensor([[2 / 3], [0.0]]) * mean
    assert torch.allclose(call("model_stock", [t1, t2], zero, filter_wise=True), per_row)
    assert torch.allclose(call("model_stock", [t1 + ONES, t2 + ONES], ONES), ONES + 2 / 7 * mean)


def paper_arcee(base: torch.Tensor, other: torch.Tensor, seed_draws=None, k: float = 1.5) -> torch.Tensor:
    """docs/method.md's Arcee Fusion written out directly (the reference the engine's version must match)."""
    delta = other - base
    r2 = other.reshape(1, -1) if other.dim() == 1 else other
    b2 = base.reshape(1, -1) if base.dim() == 1 else base
    p = torch.softmax(r2, -1) + 1e-8
    q = torch.softmax(b2, -1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1)
    s = (delta.reshape(r2.shape).abs() * kl[:, None]).reshape(-1)

    def quant(x, qs):
        xs = torch.sort(x).values
        return [xs[math.floor(q_ * (xs.numel() - 1))] for q_ in qs]

    if s.numel() > SAMPLE:
        draw1, draw2 = seed_draws
        (med,) = quant(s[draw1], [0.5])
        q1, q3 = quant(s[draw2], [0.25, 0.75])
    else:
        q1, med, q3 = quant(s, [0.25, 0.5, 0.75])
    tau = med + k * (q3 - q1)
    return base + (s.reshape(delta.shape) >= tau) * delta


@pytest.mark.parametrize("shape", [(7, 11), (300,), (1500, 800)])  # below and above 10^6 elements
def test_arcee_fusion_matches_the_paper_equations(shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    other = base + 0.05 * torch.randn(shape, generator=g)
    ours = call("arcee_fusion", [other], base, seed=0, tensor_name="w")
    draws = None
    if base.numel() > SAMPLE:
        sub = Subsample(row_spans(*shape), shape[1], tensor_seed(0, "w", 0), torch.float32, "cpu")
        draws = [sub.indices(w) for w in (0, 1)]
    ref = paper_arcee(base, other, draws)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.equal(
        ours, call("arcee_fusion", [other], base, seed=0, tensor_name="w")
    )  # same seed, same output
    frac = ((ours - base).abs() > 0).float().mean().item()
    assert 0.0 < frac < 0.5  # an outlier threshold keeps a minority of coordinates


@pytest.mark.parametrize("k", [0.5, 3.0])
def test_arcee_fusion_k_is_used_above_a_million_entries(k):
    """Guards against a threshold that ignores `k` on the subsampled path (planted: k hard-coded to 1.5
    when S has more than 10^6 entries): a 1.2M-entry tensor must match the reference at k."""
    shape = (1500, 800)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    other = base + 0.05 * torch.randn(shape, generator=g)
    ours = call("arcee_fusion", [other], base, seed=0, tensor_name="w", k=k)
    sub = Subsample(row_spans(*shape), shape[1], tensor_seed(0, "w", 0), torch.float32, "cpu")
    ref = paper_arcee(base, other, [sub.indices(w) for w in (0, 1)], k=k)
    assert torch.allclose(ours, ref, atol=1e-6)
    default = paper_arcee(base, other, [sub.indices(w) for w in (0, 1)])
    assert (ref != default).sum() > 1000  # k moves the threshold: a wrong k cannot pass by chance


def test_arcee_subsamples_are_uniform_draws_with_replacement():
    """Drawn block by block (multinomial counts, uniform positions), each subsample must still look
    like 10⁶ independent uniform draws over all entries: decile counts and duplicate rate."""
    rows, cols = 4864, 896  # a Qwen2.5-0.5B MLP matrix: 17 blocks of rows
    sub = Subsample(row_spans(rows, cols), cols, seed=3, dtype=torch.float32, device="cpu")
    n = rows * cols
    a, b = sub.indices(0), sub.indices(1)
    assert a.numel() == b.numel() == SAMPLE and int(a.min()) >= 0 and int(a.max()) < n
    for idx in (a, b):
        deciles = torch.bincount(idx * 10 // n, minlength=10).double()
        chi2 = float(((deciles - SAMPLE / 10) ** 2 / (SAMPLE / 10)).sum())
        assert chi2 < 30  # 9 degrees of freedom: p < 0.001 would be 27.9
        distinct = torch.unique(idx).numel()  # with replacement: E = n(1 − (1 − 1/n)^SAMPLE)
        expected = n * (1 - (1 - 1 / n) ** SAMPLE)
        assert abs(distinct - expected) < 5 * math.sqrt(expected * 0.1)
    assert not torch.equal(a, b)  # two independent draws
    again = Subsample(row_spans(rows, cols), cols, seed=3, dtype=torch.float32, device="cpu")
    assert torch.equal(again.indices(0), a)  # seeded


def test_arcee_subsample_depends_on_seed():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1200, 900, generator=g)
    other = base + 0.05 * torch.randn(1200, 900, generator=g)
    a = call("arcee_fusion", [other], base, seed=0, tensor_name="w")
    b = call("arcee_fusion", [other], base, seed=1, tensor_name="w")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_identical_models_returns_the_model(name):
    m = get_method(name)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    n = max(m.min_models, 2) if m.max_models is None or m.max_models >= 2 else 1
    params = {p: [v] * n for p, v in m.model_params.items()}
    params.update(m.global_params, tensor_name="w")
    if m.needs_importance:
        params["importance"] = [torch.rand(4, 5) for _ in range(n)]
    if m.needs_activations:  # what the activation pass writes (ACM's per-layer coefficients)
        params["coef"] = [0.5] * n
    if name in ("ties", "dare_ties", "dare_linear"):
        params["density"] = [0.5] * n
    out = m([x.clone() for _ in range(n)], x.clone() if m.needs_base else None, **params)
    assert torch.allclose(out, x, atol=1e-6), name


def test_ties_at_density_one_with_one_model_is_task_arithmetic():
    g = torch.Generator().manual_seed(4)
    base, t = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    ties = call("ties", [t], base, weight=[0.7], density=[1.0], normalize=False, lambda_=1.0, tensor_name="w")
    ta = call("task_arithmetic", [t], base, weight=[0.7], lambda_=1.0)
    assert torch.allclose(ties, ta)


def test_dare_keeps_density_and_rescales():
    g = torch.Generator().manual_seed(5)
    base, t = torch.zeros(400, 500), torch.randn(400, 500, generator=g)
    out = call("dare_linear", [t], base, weight=[1.0], density=[0.3], tensor_name="w", seed=7)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], t[kept] / 0.3)
    assert torch.equal(
        out, call("dare_linear", [t], base, weight=[1.0], density=[0.3], tensor_name="w", seed=7)
    )
    assert not torch.equal(
        out, call("dare_linear", [t], base, weight=[1.0], density=[0.3], tensor_name="w", seed=8)
    )
    # unbiased: the mean over many seeds approaches task arithmetic
    mean = (
        sum(
            call("dare_linear", [t[:20]], base[:20], weight=[1.0], density=[0.5], tensor_name="w", seed=s)
            for s in range(400)
        )
        / 400
    )
    assert (mean - t[:20]).abs().mean() < 0.05


def test_dare_with_density_one_is_task_arithmetic():
    g = torch.Generator().manual_seed(6)
    base, t1, t2 = (torch.randn(3, 4, generator=g) for _ in range(3))
    dare = call("dare_linear", [t1, t2], base, weight=[0.5, 0.5], density=[1.0, 1.0], tensor_name="w")
    ta = call("task_arithmetic", [t1, t2], base, weight=[0.5, 0.5])
    assert torch.allclose(dare, ta, atol=1e-6)


def test_importance_fusion_generalises_arcee_fusion():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(30, 40, generator=g)
    e1, e2 = (base + 0.1 * torch.randn(30, 40, generator=g) for _ in range(2))
    one = call("importance_fusion", [e1], base, weight=[1.0], tensor_name="w")
    assert torch.equal(one, call("arcee_fusion", [e1], base, tensor_name="w"))
    both = call("importance_fusion", [e1, e2], base, weight=[1.0, 1.0], tensor_name="w")
    a1 = call("arcee_fusion", [e1], base, tensor_name="w") - base
    a2 = call("arcee_fusion", [e2], base, tensor_name="w") - base
    claims = (a1 != 0).float() + (a2 != 0).float()
    assert torch.allclose(both, base + (a1 + a2) / claims.clamp_min(1), atol=1e-6)
    half = call("importance_fusion", [e1], base, weight=[0.5], tensor_name="w")
    assert torch.allclose(half - base, 0.5 * (one - base), atol=1e-6)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown merge method 'tie'; known methods"):
        get_method("tie")


def test_kth_largest_is_exact_on_large_tensors():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5_000_000, generator=g).abs()
    for k in (1, 1000, 2_500_000, 4_999_999):
        assert kth_largest_of(x, k, seed=1) == torch.kthvalue(x, x.numel() - k + 1).values
    ties = torch.cat([torch.zeros(3_000_000), torch.ones(2_000_000)])
    assert kth_largest_of(ties, 2_500_000) == 0.0 and kth_largest_of(ties, 2_000_000) == 1.0


def _inputs(m, g, shape, n):
    """Base, n models near it and every parameter (defaults; weights and densities that exercise the
    method) for a property test."""
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    params = {p: [v] * n for p, v in m.model_params.items()}
    params.update(m.global_params, tensor_name="w")
    if "density" in params:
        params["density"] = [0.5] * n
    if m.needs_importance:
        params["importance"] = [torch.rand(shape, generator=g) for _ in range(n)]
    if m.needs_activations:
        params["coef"] = [0.75, 0.0, 0.5][:n]  # 0: a NaN/Inf in that model still reaches the output
    return base, tensors, params


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_method_propagates_nan_and_inf(name, bad):
    """The executor checks only outputs, so every method must let a NaN/Inf anywhere in any input
    (base and importance included) reach the output at that entry, whatever the weights. Guards
    against a method that selects around a bad entry (planted: Fisher's `torch.where(den > eps, …)`,
    which sends a NaN importance to the plain average, passed a NaN Fisher entry silently)."""
    m = get_method(name)
    n = 1 if m.max_models == 1 else (2 if m.max_models == 2 else 3)
    base, tensors, params = _inputs(m, torch.Generator().manual_seed(11), (64, 40), n)
    if "weight" in params:
        params["weight"] = [0.0, 1.0, -0.5][:n]
    imp = params.pop("importance", [])
    for which in range(n + 1 + len(imp)):
        ins = [t.clone() for t in [*tensors, base, *imp]]
        ins[which][5, 7] = bad
        if which == n and not m.needs_base:
            continue
        extra = {"importance": ins[n + 1 :]} if imp else {}
        out = m(ins[:n], ins[n] if m.needs_base else None, **params, **extra)
        assert not torch.isfinite(out[5, 7]), (name, which)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_out_dtype_rounds_the_same_result_block_by_block(name):
    """The executor rounds each block into the output dtype while it is in cache: the same values as
    computing in fp32 and rounding the whole tensor afterwards, bit for bit, from bf16 inputs."""
    m = get_method(name)
    n = 1 if m.max_models == 1 else (2 if m.max_models == 2 else 3)
    base, tensors, params = _inputs(m, torch.Generator().manual_seed(5), (700, 600), n)  # > 1 block
    tensors = [t.bfloat16() for t in tensors]
    b = base.bfloat16() if m.needs_base else None
    wide = m(tensors, b, dtype=torch.float32, **params)
    narrow = m(tensors, b, dtype=torch.float32, out_dtype=torch.bfloat16, **params)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert torch.equal(narrow, wide.bfloat16())


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(1_000_003, generator=torch.Generator().manual_seed(3)),  # both signs
        torch.randn(5000, generator=torch.Generator().manual_seed(4)).abs() * 1e-30,  # subnormals too
        torch.cat([torch.zeros(700), torch.ones(301)]),  # heavy ties
        torch.tensor([2.5]),
        torch.tensor([-1.0, -0.0, 0.0, float("inf"), -float("inf"), 3.0]),
    ],
)
def test_radix_quantiles_equal_the_sorted_reference(values):
    qs = [0.0, 0.25, 0.5, 0.75, 1.0]
    ordered = torch.sort(values).values
    want = [float(ordered[math.floor(q * (values.numel() - 1))]) for q in qs]
    assert [float(v) for v in quantiles(values, qs)] == want
    assert [float(v) for v in quantiles(values.double(), qs)] == want  # the non-float32 path
