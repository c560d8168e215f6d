"""ACM (Activation-Guided Consensus Merging): the mutual-information estimate and coefficients by hand,
the activation pass and the merge against a dense reference written here (whole hidden-state matrices
from `output_hidden_states` with the final norm switched off, numpy histograms), on tiny Qwen2 models
built in this file, and every bad calibration input named with its fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from branchmerge.config import ConfigError, validate
from branchmerge.config.schema import CalibrationConfig, MergeConfig
from branchmerge.errors import DataError, MergeRecipeError, MissingFileError
from branchmerge.merge import activations
from branchmerge.merge.activations import coef_map, normalized_mutual_information, prepare
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.methods import get_method
from branchmerge.merge.recipe import RecipeError, parse_steps, resolve_value
from tests.conftest import TOY_BASE, compose

LAYERS = 3
# per-layer noise on each branch's decoder layers: math moves the late layers, science the early ones
SCALES = {"math": [0.0, 0.05, 0.3], "science": [0.2, 0.02, 0.0]}


def tiny_models(root: Path) -> dict[str, Path]:
    """A 3-layer Qwen2 base (hidden 32, the toy tokenizer), two branches with per-layer noise, and a
    branch identical to the base."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    cfg = Qwen2Config(
        vocab_size=896,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(cfg)
    for p in base.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.2)
    paths = {}
    for name, scales in {"base": [0.0] * LAYERS, **SCALES, "same": [0.0] * LAYERS}.items():
        g = torch.Generator().manual_seed(len(name))
        model = Qwen2ForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        for n, p in model.named_parameters():
            if ".layers." in n:
                p.data += scales[int(n.split(".layers.")[1].split(".")[0])] * torch.randn(
                    p.shape, generator=g
                )
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def records(path: Path, n: int, topic: str) -> Path:
    rows = [
        {
            "id": f"{topic}-{k}",
            "domain": topic,
            "source": "test",
            "messages": [
                {"role": "user", "content": f"{topic}: what is {k} + {2 * k}?"},
                {"role": "assistant", "content": f"<think>\n{k} + {2 * k} = {3 * k}.\n</think>\n\n{3 * k}"},
            ],
            "reference": str(3 * k),
        }
        for k in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("acm")
    return {
        "models": tiny_models(root / "models"),
        "files": [str(records(root / "math.jsonl", 5, "math")), str(records(root / "sci.jsonl", 5, "sci"))],
    }


def calibration(files, **kw) -> CalibrationConfig:
    return CalibrationConfig(files=list(files), **{"rows": 6, "max_tokens": 24, "bins": 8, **kw})


def steps_for(inputs: list[str], **params):
    return parse_steps(
        [{"name": "m", "method": "acm", "base": "base", "inputs": inputs, "params": params}],
        {"base", "math", "science", "same"},
    )


# ---- by hand ---------------------------------------------------------------------------------------
def test_normalized_mutual_information_by_hand():
    """8 paired samples, 2 bins: X's bins 00001111, Y's 00010111, so the joint histogram is
    [[3, 1], [1, 3]] / 8, I = ln 2 − H_b(1/4) nats and NMI = 1 − H_b(1/4) / ln 2 = 0.188722
    (coefficient 0.811278). A copy, or any increasing function of x, determines every bin: NMI 1."""
    x = torch.arange(8.0)
    y = torch.tensor([0.0, 1, 2, 4, 3, 5, 6, 7])
    hb = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_mutual_information(x, y, 2) == pytest.approx(1 - hb / math.log(2), abs=1e-12)
    assert 1 - normalized_mutual_information(x, y, 2) == pytest.approx(0.811278, abs=1e-6)
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    assert normalized_mutual_information(z, z.clone(), 16) == 1.0
    assert normalized_mutual_information(z, z.exp() * 3 + 1, 16) == 1.0
    w = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    assert normalized_mutual_information(z, w, 16) < 0.02  # independent: only the estimate's bias


def test_acm_merges_by_hand():
    """W = B + λ Σ_i w_i c_i Δ_i on 2×3 tensors: B = 0, Δ_1 = 1, Δ_2 = 2·1, w = (1, 2), c = (0.25, 0.5),
    λ = 2 gives 2 · (0.25 + 2 · 0.5 · 2) = 4.5 everywhere."""
    base, ones = torch.zeros(2, 3), torch.ones(2, 3)
    out = get_method("acm")([ones, 2 * ones], base, weight=[1.0, 2.0], coef=[0.25, 0.5], lambda_=2.0)
    assert torch.equal(out, torch.full((2, 3), 4.5))
    with pytest.raises(MergeRecipeError, match="no coefficient for tensor 'w'"):
        get_method("acm")([ones], base, tensor_name="w")  # no activation pass, no `coef`


def test_each_layer_reads_its_own_coefficient_and_the_rest_the_mean():
    """Guards against `.layers.1.` catching layers 10–19 or a layer reading its neighbour's value."""
    spec = coef_map([k / 100 for k in range(12)])
    for k in range(12):
        assert resolve_value(spec, f"model.layers.{k}.mlp.up_proj.weight", 12) == k / 100
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolve_value(spec, name, 12) == pytest.approx(0.055)


# ---- the dense reference ---------------------------------------------------------------------------
@torch.no_grad()
def reference_hidden(model_dir: Path, rows: list[list[int]]) -> list[np.ndarray]:
    """Per decoder layer, its outputs over all rows' tokens (T, H) flattened row-major, read from
    `output_hidden_states` with the final norm replaced by the identity (HF normalises the last entry)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.norm = torch.nn.Identity()
    per_row = [model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[1:] for r in rows]
    return [np.concatenate([h[k][0].numpy().reshape(-1) for h in per_row]) for k in range(LAYERS)]


def reference_nmi(x: np.ndarray, y: np.ndarray, bins: int) -> float:
    def binned(v):
        rank = np.empty(v.size, dtype=np.int64)
        rank[np.argsort(v, kind="stable")] = np.arange(v.size)
        return rank * bins // v.size

    joint = np.zeros((bins, bins))
    np.add.at(joint, (binned(x), binned(y)), 1.0)
    joint /= x.size
    h = lambda p: -sum(q * math.log(q) for q in p.reshape(-1) if q > 0)  # noqa: E731
    hx, hy = h(joint.sum(1)), h(joint.sum(0))
    return (hx + hy - h(joint)) / math.sqrt(hx * hy)


def reference_rows(files: list[str], rows: int, max_tokens: int) -> list[list[int]]:
    """The calibration rows taken in turn from each file: file 0's first, file 1's first, file 0's second…"""
    from transformers import AutoTokenizer

    from branchmerge.data.tokenize import encode_messages

    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    lines = [[json.loads(x) for x in Path(f).read_text().splitlines()] for f in files]
    order = [lines[k % 2][k // 2] for k in range(rows)]
    return [encode_messages(r["messages"], tok, "chatml")["input_ids"][:max_tokens] for r in order]


def test_the_pass_and_the_merge_match_the_dense_reference(world, tmp_path):
    """Every entry of every layer (samples ≥ T·H), so the reference needs no sampling. Guards against
    coefficients applied to the wrong layer (planted: `coef_map` keyed `.layers.{k + 1}.` fails here),
    against the last layer read after the final norm, and against rows taken from one file only."""
    cal = calibration(world["files"], samples=1 << 20)
    steps = steps_for([{"model": "math", "weight": 0.7}, "science"], lambda_=0.9)
    record = prepare(steps, world["models"], cal)
    rows = reference_rows(world["files"], 6, 24)
    assert record["rows"] == 6 and record["tokens"] == sum(map(len, rows))
    hidden = {m: reference_hidden(world["models"][m], rows) for m in ("base", "math", "science")}
    coef = {}
    for m in ("math", "science"):
        nmi = [reference_nmi(hidden["base"][k], hidden[m][k], 8) for k in range(LAYERS)]
        assert record["pairs"][f"base->{m}"]["nmi"] == pytest.approx(nmi, abs=1e-9)
        coef[m] = [1 - v for v in nmi]
    assert coef["math"][2] > coef["math"][0] + 0.1  # math moved its late layers, not its first

    merge(world["models"], steps, tmp_path / "o", MergeOptions(progress=False))
    out = load_file(tmp_path / "o" / "model.safetensors")
    sd = {m: load_file(world["models"][m] / "model.safetensors") for m in ("base", "math", "science")}
    for name, got in out.items():
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        c = {m: (coef[m][layer] if layer is not None else sum(coef[m]) / LAYERS) for m in coef}
        want = sd["base"][name] + 0.9 * (
            0.7 * c["math"] * (sd["math"][name] - sd["base"][name])
            + c["science"] * (sd["science"][name] - sd["base"][name])
        )
        assert torch.allclose(got, want, atol=1e-6), name


def test_a_branch_identical_to_the_base_gets_coefficient_zero(world):
    """The same sampled entries in every model (samples < T·H here): a copy of the base has NMI 1 in
    every layer, so c = 0. Guards against each model drawing its own entries (planted: a seed per
    model gives NMI ≈ 0 and c ≈ 1 for the copy)."""
    cal = calibration(world["files"], samples=2048)
    steps = steps_for(["same", "math"])
    record = prepare(steps, world["models"], cal)
    assert record["samples"] == 2048 < record["tokens"] * 32
    assert record["pairs"]["base->same"] == {"nmi": [1.0] * LAYERS, "coef": [0.0] * LAYERS}
    assert steps[0].inputs[0].params["coef"] == {**coef_map([0.0] * LAYERS)}


def test_the_pass_is_seeded_and_its_record_is_reused(world, monkeypatch):
    """The same settings give the same coefficients; a record with the same key (the output's
    provenance) fills `coef` without loading any model; another seed samples other entries."""
    cal = calibration(world["files"], samples=2048)
    first = prepare(steps_for(["math"]), world["models"], cal)
    again = prepare(steps_for(["math"]), world["models"], cal)
    assert again["pairs"] == first["pairs"] and again["key"] == first["key"]

    def boom(*a, **k):
        raise AssertionError("a cached record must not forward any model")

    monkeypatch.setattr(activations, "layer_samples", boom)
    steps = steps_for(["math"])
    assert prepare(steps, world["models"], cal, cached=first) is first
    assert steps[0].inputs[0].params["coef"] == coef_map(first["pairs"]["base->math"]["coef"])
    with pytest.raises(AssertionError, match="must not forward"):  # other settings: another key
        prepare(
            steps_for(["math"]), world["models"], calibration(world["files"], samples=2048, seed=1), first
        )
    a, b = (activations.sample_positions(100, 32, 512, s) for s in (0, 1))
    assert a.numel() == 512 and not torch.equal(a, b)


def test_models_are_loaded_one_at_a_time(world, monkeypatch):
    """Memory stays at one model: when a model is loaded, no earlier one is still alive."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    real, alive = AutoModelForCausalLM.from_pretrained, []

    def load(*a, **k):
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier model is still in memory"
        model = real(*a, **k)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    prepare(steps_for(["math", "science"]), world["models"], calibration(world["files"], samples=2048))
    assert len(alive) == 3  # base, math, science: each once


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_calibration_input_names_the_file_row_and_fix(world, tmp_path):
    models = world["models"]
    with pytest.raises(MissingFileError, match=r"calibration file .*nope.jsonl does not exist: set"):
        prepare(steps_for(["math"]), models, calibration([str(tmp_path / "nope.jsonl")]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl holds no records"):
        prepare(steps_for(["math"]), models, calibration([str(tmp_path / "empty.jsonl")]))
    bad = records(tmp_path / "bad.jsonl", 3, "x")
    bad.write_text(bad.read_text().replace('"domain": "x", ', "", 1).replace("\n", "\n{oops\n", 1))
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing key 'domain'.*\(a calibration row: fix or"):
        prepare(steps_for(["math"]), models, calibration([str(bad)]))
    with pytest.raises(MergeRecipeError, match=r"needs per-layer coefficients for 'math': give calibration"):
        prepare(steps_for(["math"]), models, calibration([]))
    with pytest.raises(MergeRecipeError, match="has no coefficients for 'math'"):  # the engine, directly
        merge(models, steps_for(["math"]), tmp_path / "o", MergeOptions(progress=False))
    with pytest.raises(RecipeError, match="per layer of one base: no `slices`"):
        parse_steps(
            [{"name": "s", "method": "acm", "slices": [{"inputs": [{"model": "a", "layer_range": [0, 1]}]}]}],
            {"a"},
        )
    cfg = compose("merge", ["merge=acm", "calibration.bins=1", "calibration.samples=100"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, MergeConfig)
    assert "calibration.bins: must be >= 2, got 1" in str(e.value)
    with pytest.raises(ConfigError, match=r"calibration.samples: 100 samples leave the 8x8 joint"):
        validate(
            compose("merge", ["merge=acm", "calibration.bins=8", "calibration.samples=100"]), MergeConfig
        )


def test_merge_py_code_path_runs_the_pass_and_reuses_it(world, tmp_path, caplog):
    """`merge.run.run` on a composed config: the activation pass's record lands in the output's
    merge_provenance.json; the same merge again is reused whole; another λ into the same folder merges
    again from the recorded coefficients without a forward pass."""
    from branchmerge.merge.run import run

    m = world["models"]
    over = [
        "merge=acm",
        *(f"+models.{k}={m[k]}" for k in ("base", "math", "science")),
        "base=base",
        "inputs=[math,science]",
        f"calibration.files=[{','.join(world['files'])}]",
        "calibration.rows=6",
        "calibration.bins=8",
        f"output_dir={tmp_path / 'o'}",
        f"paths.output_dir={tmp_path}",
        "options.progress=false",
    ]
    first = run(compose("merge", over))
    prov = json.loads((tmp_path / "o" / "merge_provenance.json").read_text())
    assert prov["acm"]["pairs"].keys() == {"base->math", "base->science"}
    assert prov["recipe"]["calibration"]["files"] == world["files"]
    assert set(prov["acm"]["calibration"]["files"]) == set(world["files"])
    same = json.loads(json.dumps(first, default=str))
    assert run(compose("merge", over)) == same  # reused: nothing merged again
    caplog.set_level("INFO")
    again = run(compose("merge", [*over, "params.lambda_=0.5"]))
    assert "reusing the coefficients" in caplog.text and again["acm"] == prov["acm"]
