"""Methods no merging tool ships: TSV-M, Iso-C / Iso-CTS and the LiNeS modifier, against values worked
out by hand and against small dense reference implementations written here from the papers' equations
(independent of the methods' code: orthogonalisation by the inverse square root of the Gram matrix
instead of an SVD, task and common subspaces concatenated in another order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.methods import get_method, iso, tsv  # noqa: F401  (registers the methods)
from branchmerge.merge.methods.iso import split_rank
from branchmerge.merge.recipe import RecipeError, parse_steps

SPECTRAL = ("tsv_m", "iso_c", "iso_cts")


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch, as the engine runs methods: a multi-threaded LAPACK SVD on a busy shared
    machine waits at its OpenMP barriers (a 700 × 500 SVD: 0.09 s on one thread, 5 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call(name, tensors, base, **params):
    return get_method(name)(tensors, base, **params)


# ---- dense references (whole fp64 matrices, straight from the equations) ----------------------------
def orthonormalised(x: torch.Tensor) -> torch.Tensor:
    """x (xᵀx)^(-1/2): the polar factor of a full-column-rank x, by the Gram matrix's eigenvectors."""
    lam, q = torch.linalg.eigh(x.T @ x)
    return x @ (q * lam.rsqrt()) @ q.T


def svd_top(d: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(d)
    return u[:, :k], s[:k], vh[:k].T


def tsv_reference(deltas: list[torch.Tensor], lam: float) -> torch.Tensor:
    k = max(1, min(deltas[0].shape) // len(deltas))
    parts = [svd_top(d, k) for d in deltas]
    u = orthonormalised(torch.cat([p[0] for p in parts], 1))
    v = orthonormalised(torch.cat([p[2] for p in parts], 1))
    return lam * u @ torch.diag(torch.cat([p[1] for p in parts])) @ v.T


def iso_reference(deltas: list[torch.Tensor], lam: float, fraction: float) -> torch.Tensor:
    r, n = min(deltas[0].shape), len(deltas)
    c, s = split_rank(r, n, fraction)
    uc, sc, vc = svd_top(sum(deltas), c)
    tasks = [svd_top(d - uc @ uc.T @ d, s) for d in deltas]  # the task-specific directions
    u = orthonormalised(torch.cat([t[0] for t in tasks] + [uc], 1))
    v = orthonormalised(torch.cat([t[2] for t in tasks] + [vc], 1))
    return lam * torch.cat([t[1] for t in tasks] + [sc]).mean() * u @ v.T


def close(out: torch.Tensor, base: torch.Tensor, ref_delta: torch.Tensor) -> bool:
    """The merged delta equals the reference's to 1e-4 of its norm (fp32 SVDs vs fp64)."""
    return float((out.double() - base.double() - ref_delta).norm() / ref_delta.norm()) < 1e-4


def _random(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


# ---- by hand ----------------------------------------------------------------------------------------
def test_tsv_m_by_hand():
    """Task vectors in orthogonal subspaces (nothing to decorrelate) add up as in task arithmetic."""
    base = torch.ones(2, 3)
    d1 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    d2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    out = call("tsv_m", [base + d1, base + d2], base, tensor_name="w")
    assert torch.allclose(out, base + d1 + d2, atol=1e-6)
    half = call("tsv_m", [base + d1, base + d2], base, lambda_=0.5)
    assert torch.allclose(half, base + 0.5 * (d1 + d2), atol=1e-6)


def test_iso_c_by_hand():
    """Σ Δ_i = [[3,0,0],[0,1,0]]: σ = (3, 1), σ̄ = 2, U Vᵀ = [[1,0,0],[0,1,0]]."""
    base = torch.zeros(2, 3)
    d1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    d2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    flat = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert torch.allclose(call("iso_c", [d1, d2], base), flat, atol=1e-6)
    assert torch.allclose(call("iso_c", [d1, d2], base, lambda_=0.5), flat / 2, atol=1e-6)


def test_iso_cts_rank_split_by_hand():
    """c + N·s = r with N·s the task-specific share rounded to a multiple of N (never above r)."""
    assert split_rank(896, 3, 0.8) == (716, 60)  # ⌊716.8⌋ = 716, 180/3 = 60
    assert split_rank(10, 3, 0.5) == (4, 2)  # (10 − 5)/3 = 1.67 -> 2 per task
    assert split_rank(10, 3, 1.0) == (10, 0)  # Iso-C
    assert split_rank(2, 3, 0.0) == (2, 0)  # no room for 3 task subspaces
    with pytest.raises(ValueError, match="common_space_fraction must be in"):
        split_rank(10, 3, 1.5)


def test_vectors_and_vocabulary_take_the_mean_task_vector():
    """Biases/norms (1-D) and, unless svd_vocab, embed_tokens / lm_head: W = B + λ · mean_i Δ_i."""
    base, models = _random((40, 24), 3, seed=1)
    mean = base + 0.7 * (sum(models) / 3 - base)
    for name in SPECTRAL:
        for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
            out = call(name, models, base, tensor_name=tensor, lambda_=0.7)
            assert torch.allclose(out, mean, atol=1e-6), (name, tensor)
        out = call(name, [m[0] for m in models], base[0], tensor_name="model.norm.weight", lambda_=0.7)
        assert torch.allclose(out, mean[0], atol=1e-6), name
        svd = call(name, models, base, tensor_name="lm_head.weight", lambda_=0.7, svd_vocab=True)
        assert not torch.allclose(svd, mean, atol=1e-3), name


# ---- against the dense references -------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("shape", [(600, 500), (90, 200)])  # (600, 500): two blocks of the executor
def test_tsv_m_matches_the_dense_reference(shape, n):
    """Guards the concatenate-then-orthogonalise step (planted: `polar` returning its input unchanged,
    i.e. summing the tasks' low-rank parts without decorrelating them, fails here) and the rank kept
    per task (r/N)."""
    base, models = _random(shape, n, seed=2)
    ref = tsv_reference([m.double() - base.double() for m in models], 0.8)
    out = call("tsv_m", models, base, lambda_=0.8, tensor_name="model.layers.0.mlp.up_proj.weight")
    assert close(out, base, ref)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("shape", [(600, 500), (70, 30)])
def test_iso_matches_the_dense_reference(shape, fraction):
    """Guards the projection out of the common subspace (planted: skipping `d.sub_(u @ (u.T @ d))`
    fails here for every fraction below 1) and the isotropic σ̄ over all r directions."""
    base, models = _random(shape, 3, seed=3)
    deltas = [m.double() - base.double() for m in models]
    out = call("iso_cts", models, base, lambda_=1.3, common_space_fraction=fraction, tensor_name="w")
    assert close(out, base, iso_reference(deltas, 1.3, fraction))
    if fraction == 1.0:
        assert torch.allclose(call("iso_c", models, base, lambda_=1.3), out, atol=1e-6)


def test_iso_spectrum_is_flat_and_tsv_decorrelates():
    """Iso's merged delta has r equal singular values; TSV-M's left singular blocks are orthonormal."""
    base, models = _random((80, 60), 3, seed=4)
    for name in ("iso_c", "iso_cts"):
        s = torch.linalg.svdvals((call(name, models, base) - base).double())
        assert (s.max() - s.min()) / s.max() < 1e-4, name
    s = torch.linalg.svdvals((call("tsv_m", models, base) - base).double())
    assert (s > 1e-4 * s.max()).sum() == 60  # 3 tasks × 20 directions


def test_an_fp32_svd_that_does_not_converge_is_redone_in_fp64(monkeypatch):
    """LAPACK's fp32 gesdd failed to converge on an Iso-CTS projected 896 × 896 task vector of the
    0.5B benchmark (716 near-zero singular values). Simulated here: fp32 SVDs raise, and the merge
    still equals the reference (planted: no fp64 retry in `tsv.svd`, the LinAlgError escapes)."""
    base, models = _random((60, 50), 3, seed=9)
    svd = torch.linalg.svd

    def fp32_fails(x, *a, **kw):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(x, *a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", fp32_fails)
    out = call("iso_cts", models, base, tensor_name="w")
    monkeypatch.undo()
    deltas = [m.double() - base.double() for m in models]
    assert close(out, base, iso_reference(deltas, 1.0, 0.8))


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_input_entry_reaches_the_output(name, bad):
    """An SVD cannot run on NaN/Inf: the method falls back to the mean task vector, which carries the
    bad entry to the output at its place, for the executor to name the input at fault."""
    base, models = _random((64, 40), 3, seed=5)
    for which in range(4):
        ins = [t.clone() for t in [*models, base]]
        ins[which][5, 7] = bad
        out = call(name, ins[:3], ins[3], tensor_name="w")
        assert not torch.isfinite(out[5, 7]), (name, which)


# ---- LiNeS ------------------------------------------------------------------------------------------
LINES = {"alpha": 0.3, "beta": 0.6}


@pytest.mark.parametrize(
    ("tensor", "depth", "lam"),
    [
        ("model.layers.3.mlp.up_proj.weight", 0.75, 0.3 + 0.6 * 0.75),  # block 3 of 5
        ("model.layers.0.self_attn.q_proj.weight", 0.0, 0.3),
        ("model.layers.4.mlp.down_proj.weight", 1.0, 0.9),
        ("model.embed_tokens.weight", 0.0, 0.3),  # outside the blocks: α
        ("model.norm.weight", 1.0, 0.3),  # after the blocks: α, not α + β
        ("lm_head.weight", 1.0, 0.3),
    ],
)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m", "iso_cts"])
def test_lines_scales_any_task_vector_method_by_depth(method, tensor, depth, lam):
    """W = B + λ(ℓ)·(W₀ − B), W₀ the method's merge, λ(ℓ) = α + β·ℓ in the blocks and α elsewhere.
    Guards against scaling the tensors after the last block by their depth 1 (planted: ignoring the
    block test in `lines_scale`, so model.norm got α + β, fails here)."""
    base, models = _random((30, 20), 2, seed=6)
    kw = {"tensor_name": tensor, "layer_fraction": depth}
    if method == "ties":
        kw["density"] = [0.5, 0.5]
    plain = call(method, models, base, **kw)
    scaled = call(method, models, base, lines=LINES, **kw)
    assert torch.allclose(scaled, base + lam * (plain - base), atol=1e-6)


def test_lines_keeps_nan_and_inf_and_needs_a_base():
    """λ·(W₀ − B) + B with λ = 0, ½ or 2 keeps a NaN/±Inf of any input non-finite (0·∞ is NaN)."""
    base, models = _random((30, 20), 2, seed=7)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for lines in ({"alpha": 0.0, "beta": 0.0}, {"alpha": 0.5, "beta": 0.0}, {"alpha": 1.0, "beta": 1.0}):
            for which in range(3):  # a model or the base
                ins = [t.clone() for t in [*models, base]]
                ins[which][2, 3] = bad
                out = call("task_arithmetic", ins[:2], ins[2], lines=lines, tensor_name="model.layers.1.w")
                assert not torch.isfinite(out[2, 3]), (bad, lines, which)
    with pytest.raises(ValueError, match="lines scales task vectors"):
        call("linear", models, None, lines=LINES)


def test_a_recipe_step_takes_lines_and_reports_bad_ones():
    models = {"base", "a", "b"}
    step = {"name": "s", "method": "ties", "base": "base", "inputs": ["a", "b"], "lines": LINES}
    assert parse_steps([step], models)[0].lines == LINES
    bad = [
        {"name": "l", "method": "linear", "inputs": ["a", "b"], "lines": LINES},
        {**step, "name": "t", "lines": {"alpha": 0.3}},
        {**step, "name": "u", "lines": {"alpha": "x", "beta": 1}},
    ]
    with pytest.raises(RecipeError) as e:
        parse_steps(bad, models)
    msg = str(e.value)
    assert "steps[0] (l): lines scales task vectors θ − B; linear has no base" in msg
    assert "steps[1] (t): lines must be {alpha: number, beta: number}" in msg
    assert "steps[2] (u): lines must be" in msg


# ---- through the engine -----------------------------------------------------------------------------
def _checkpoints(root: Path) -> dict[str, Path]:
    """A bf16 base and three branches of a 3-block model: matrices larger than a block, a vector."""
    g = torch.Generator().manual_seed(8)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (700, 500) for i in range(3)}
    shapes.update({"model.embed_tokens.weight": (300, 500), "model.norm.weight": (500,)})
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out = {}
    for i, name in enumerate(("base", "a", "b", "c")):
        sd = {k: (v + 0.05 * i * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        (root / name).mkdir(parents=True)
        save_file(sd, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 3}))
        out[name] = root / name
    return out


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_the_engine_merges_checkpoints_with_lines_like_the_reference(tmp_path, method):
    """Through `merge()` with the pool (chunk_elements small, so a matrix's stats run once and its
    blocks run on the pool): the dense reference, scaled by LiNeS per block depth, rounded to bf16.
    Guards the recipe -> executor plumbing (planted: `step_params` not passing `lines`, fails here)."""
    paths = _checkpoints(tmp_path / "models")
    step = {"name": "m", "method": method, "base": "base", "inputs": ["a", "b", "c"], "lines": LINES}
    opts = MergeOptions(progress=False, hash_inputs=False, chunk_elements=1000)
    merge(paths, parse_steps([step], set(paths)), tmp_path / "out", opts)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    sd = {k: load_file(p / "model.safetensors") for k, p in paths.items()}
    for name, depth in [(f"model.layers.{i}.mlp.up_proj.weight", i / 2) for i in range(3)] + [
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
    ]:
        b = sd["base"][name].double()
        deltas = [sd[k][name].double() - b for k in "abc"]
        if depth is None:  # vocabulary and vectors: the mean task vector, scaled by α
            delta = sum(deltas) / 3
        else:
            delta = tsv_reference(deltas, 1.0) if method == "tsv_m" else iso_reference(deltas, 1.0, 0.8)
        lam = LINES["alpha"] + (LINES["beta"] * depth if depth is not None else 0.0)
        ref = b + lam * delta
        assert merged[name].dtype == torch.bfloat16
        assert torch.allclose(merged[name].double(), ref, rtol=1e-2, atol=1e-2), name
        assert (merged[name] == ref.bfloat16()).double().mean() > 0.95, name
