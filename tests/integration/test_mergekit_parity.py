"""`merge.py from_mergekit=` against mergekit's own outputs on the same YAML and the same tiny Qwen2
inputs (tests/fixtures/mergekit: recorded by make_fixtures.py with mergekit-yaml; the inputs are
rebuilt here from their seeds and checked against the recorded hashes).

Deterministic methods: every tensor within 1e-2 of mergekit's, relative to the tensor's largest
magnitude (`pytest -s` prints each run's maximum). TIES, Breadcrumbs and SCE keep exactly mergekit's
number of entries, but mergekit picks among values tied at a cut by an unstable sort, so entries may
differ where some model's |Δ| (or SCE's variance) ties across a cut; the rest match bit for bit where
`BIT_EXACT` says, within 1e-2 elsewhere. Where W ≠ B shows the kept set (one Breadcrumbs model, SCE),
both tools keep the same values, tie for tie. Randomised methods (DARE): keep rate and rescaling match
in distribution.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, compose

FIX = ROOT / "tests/fixtures/mergekit"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
RUNS = MANIFEST["runs"]
TOLERANCE = 1e-2


def _maker():
    spec = importlib.util.spec_from_file_location("mergekit_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mk_inputs")
    hashes = _maker().build_inputs(root)
    assert hashes == MANIFEST["inputs_sha256"], (
        "the rebuilt inputs differ from the ones mergekit merged (torch's seeded RNG changed?): "
        "rerun tests/fixtures/mergekit/make_fixtures.py"
    )
    return root


def _ours(name: str, inputs: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Our merge of run `name`'s YAML; vocabulary tensors' rows put in mergekit's token order (by
    token string, from out/<run>.vocab.json) so that rows are compared token by token."""
    out = _merge(name, inputs, tmp_path)
    ours = load_file(out / "model.safetensors")
    theirs_vocab = FIX / "out" / f"{name}.vocab.json"
    if theirs_vocab.is_file():
        from transformers import AutoTokenizer

        mine, theirs = (
            AutoTokenizer.from_pretrained(str(out)).get_vocab(),
            json.loads(theirs_vocab.read_text()),
        )
        assert set(mine) == set(theirs), f"{name}: output vocabularies differ: {set(mine) ^ set(theirs)}"
        order = torch.tensor([mine[t] for t, _ in sorted(theirs.items(), key=lambda kv: kv[1])])
        for k in [k for k in ours if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
            ours[k] = torch.cat([ours[k][order], ours[k][len(order) :]])
    return ours


def _merge(name: str, inputs: Path, tmp_path: Path) -> Path:
    from branchmerge.merge.run import run

    run_ = RUNS[name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    yml = tmp_path / f"{name}.yml"
    yml.write_text(yaml.safe_dump(_maker().case_yaml(run_["case"], run_["stored"], run_["dtype"], inputs)))
    out = tmp_path / "out"
    cfg = compose(
        "merge",
        [f"from_mergekit={yml}", f"output_dir={out}", "options.progress=false", "options.hash_inputs=false"],
        run_dir=tmp_path / "run",
    )
    run(cfg)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


TIED_CASES = ("ties", "breadcrumbs", "breadcrumbs_single", "breadcrumbs_ties", "sce")
# (case, compute dtype) whose untied entries match mergekit bit for bit (measured); elsewhere a
# whole-tensor sum (a rescale, SCE's η) or bf16 sums taken in another order move the last bits.
BIT_EXACT = {
    ("ties", "float32"),
    ("breadcrumbs", "float32"),
    ("breadcrumbs", "bfloat16"),
    ("breadcrumbs_single", "float32"),
    ("breadcrumbs_single", "bfloat16"),
    ("breadcrumbs_ties", "bfloat16"),
    ("sce", "bfloat16"),
}


def _tied_at_a_cut(inputs: Path, run_: dict, name: str) -> torch.Tensor:
    """Entries whose ranked quantity (in the compute dtype) equals a value at which the kept ranks
    are cut: some model's |Δ| at TIES' k-th largest or at either end of its Breadcrumbs band, or the
    variance at SCE's k-th largest. There mergekit's unstable sort and our positional rule may keep
    different (equally many) entries."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[run_["dtype"]]
    body = _maker().CASES[run_["case"]]["yaml"]
    load = lambda m: load_file(inputs / run_["stored"] / m / "model.safetensors")[name].to(dtype)  # noqa: E731
    base = load("base")
    deltas = [(load(e["model"]) - base, e.get("parameters", {})) for e in body["models"]]
    tied = torch.zeros(base.shape, dtype=torch.bool)

    def cut(values: torch.Tensor, *ks: int) -> None:  # keep the k largest: ambiguous if #k = #k+1
        flat = values.float().reshape(-1)
        desc = flat.sort(descending=True).values
        for k in ks:
            if 0 < k < flat.numel() and desc[k - 1] == desc[k]:
                tied.view(-1).logical_or_(flat == desc[k])

    n = base.numel()
    if run_["case"] == "sce":
        var = torch.var(torch.stack([d for d, _ in deltas]), dim=0, unbiased=False)
        cut(var, int(int(torch.count_nonzero(var)) * body["parameters"]["select_topk"]))
    for d, p in deltas if run_["case"] != "sce" else []:
        if run_["case"] == "ties":
            cut(d.abs(), max(1, int(p["density"] * n)))
        else:
            keep, top = int(p["density"] * n), int(p.get("gamma", 0.01) * n)
            bottom = max(0, n - keep - top)
            cut(d.abs(), n - bottom - keep, n - bottom)
    return tied


@pytest.mark.parametrize("name", sorted(n for n, r in RUNS.items() if r["kind"] == "exact"))
def test_deterministic_methods_match_mergekit(name, inputs, tmp_path):
    """Guards against a converter or method that drifts from mergekit's meaning. Planted once each:
    depth within a slice as i/n instead of i/(n − 1) (slerp_slices fails, all dtypes), a token's
    default row as the sum instead of the mean of the models that have it (tokenizer_union: 0.052),
    computing in fp32 where the YAML says `dtype: bfloat16` (Arcee Fusion's kept set moves: 0.117
    relative, fails), gradients resolved with t = 1 after the layers where mergekit uses t = 0 (linear
    and slerp fail on lm_head / model.norm), Breadcrumbs and SCE summing the models' terms in bf16
    one by one instead of in float32 as torch sums a bf16 stack (breadcrumbs, breadcrumbs_ties and sce
    in bf16 compute fail the bit-exact check). Measured maxima: 0 (ties, arcee fp32, breadcrumbs all
    dtypes, breadcrumbs_ties in bf16) to 2e-7 (fp32), 2.5e-4 to 7.6e-3 (bf16 compute: rounding of bf16
    sums; SCE 5.4e-3, 3.1e-4 in fp32 on bf16 inputs: its η move with the tied entries kept)."""
    ours, theirs = _ours(name, inputs, tmp_path), load_file(FIX / "out" / f"{name}.safetensors")
    assert ours.keys() == theirs.keys()
    run_ = RUNS[name]
    worst = 0.0
    for k in theirs:
        a, b = ours[k].float(), theirs[k].float()
        if run_["case"] in TIED_CASES:
            tied = _tied_at_a_cut(inputs, run_, k)
            # SCE's η are means over the selected entries: a tie at the cut moves the whole tensor
            exact = (run_["case"], run_["dtype"]) in BIT_EXACT and not (run_["case"] == "sce" and tied.any())
            if exact:
                assert not ((a != b) & ~tied).any(), f"{name}: '{k}' differs away from the tied entries"
            a, b = a[~tied], b[~tied]
        worst = max(worst, _relative(a, b) if b.numel() else 0.0)
    print(f"{name}: max relative difference {worst:.2e}")
    assert worst <= TOLERANCE, f"{name}: {worst:.3g} > {TOLERANCE}"
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, (
            f"{name}: '{k}' {list(ours[k].shape)} vs {list(theirs[k].shape)}"
        )


VARIANTS = ("m1", "m2", "m3")


def _ranked(inputs: Path, run_: dict, name: str) -> torch.Tensor:
    """The quantity a run ranks, in its compute dtype: |Δ| of its one model, or SCE's variance."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[run_["dtype"]]
    sd = {
        m: load_file(inputs / run_["stored"] / m / "model.safetensors")[name].to(dtype)
        for m in ("base", *VARIANTS)
    }
    deltas = [sd[m] - sd["base"] for m in VARIANTS]
    if run_["case"] == "sce":
        return torch.var(torch.stack(deltas), dim=0, unbiased=False).float()
    return deltas[0].abs().float()


@pytest.mark.parametrize(
    "name", sorted(n for n, r in RUNS.items() if r["case"] in ("breadcrumbs_single", "sce"))
)
def test_kept_entries_match_mergekit_value_for_value(name, inputs, tmp_path):
    """Where W ≠ B marks the kept entries (one Breadcrumbs model; SCE's selection), both tools keep the
    same multiset of ranked values (|Δ| or the variance, in the compute dtype): equally many at every
    value, so exactly mergekit's count at each cut, whatever entries its unstable sort picked among
    ties. Guards against keeping every tied entry (the old rule, planted: on bf16 inputs Breadcrumbs
    kept up to 11 entries too many in 17 of 27 tensors, SCE up to 3 in 5) and a variance computed
    off mergekit's rounding (planted: bf16 arithmetic step by step fails sce__bf16__bfloat16)."""
    run_ = RUNS[name]
    ours, theirs = _ours(name, inputs, tmp_path), load_file(FIX / "out" / f"{name}.safetensors")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[run_["dtype"]]
    base = load_file(inputs / run_["stored"] / "base/model.safetensors")
    for k in theirs:
        q, b = _ranked(inputs, run_, k), base[k].to(dtype)
        mine, want = q[ours[k].to(dtype) != b].sort().values, q[theirs[k].to(dtype) != b].sort().values
        assert torch.equal(mine, want), f"{name}: '{k}' keeps {mine.numel()} entries, mergekit {want.numel()}"
    print(f"{name}: kept sets equal value for value")


@pytest.mark.parametrize("name", sorted(n for n, r in RUNS.items() if r["kind"] == "random"))
def test_randomised_methods_match_in_distribution(name, inputs, tmp_path):
    """DARE: the share of entries moved off the base (≈ 1 − (1 − p)^n for n models at density p)
    within 3 points of mergekit's, and the size of the kept update (mean |W − B| over moved entries)
    within 10% (mergekit rescales by the L1 ratio, we by 1/p: equal in expectation). Guards against a
    missing or doubled rescale (planted: without 1/p the update halves) and a wrong keep rate."""
    ours, theirs = _ours(name, inputs, tmp_path), load_file(FIX / "out" / f"{name}.safetensors")
    run_ = RUNS[name]
    base = load_file(inputs / run_["stored"] / "base/model.safetensors")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[run_["dtype"]]

    def moved(sd):
        diffs = [(sd[k].to(dtype).float() - base[k].to(dtype).float()).reshape(-1) for k in sd]
        d = torch.cat(diffs)
        keep = d != 0
        return float(keep.float().mean()), float(d[keep].abs().mean())

    (rate_a, size_a), (rate_b, size_b) = moved(ours), moved(theirs)
    print(f"{name}: moved {rate_a:.3f} vs mergekit {rate_b:.3f}; mean |update| {size_a:.4g} vs {size_b:.4g}")
    assert abs(rate_a - rate_b) <= 0.03
    assert abs(size_a / size_b - 1) <= 0.10


def test_fixture_runs_cover_every_case():
    """Every case of make_fixtures.CASES was recorded (a case added without rerunning the script
    would otherwise be silently untested)."""
    recorded = {r["case"] for r in RUNS.values()}
    assert recorded == set(_maker().CASES)
    for name in RUNS:
        assert (FIX / "out" / f"{name}.safetensors").is_file() and (FIX / "yaml" / f"{name}.yml").is_file()


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mk.yml"
    p.write_text(text)
    return p


def test_methods_accepted_by_mergekit_name_come_from_the_registry(tmp_path, monkeypatch):
    """A method registered under one of mergekit's names is accepted with no list to edit; ours-only
    methods and unknown names get one error naming what is supported. Guards against a hand-kept
    list (planted: a fixed SHARED set refused the newly registered 'nearswap')."""
    from branchmerge.merge import mergekit
    from branchmerge.merge.methods import METHODS, Method
    from branchmerge.merge.recipe import RecipeError

    body = "base_model: /b\nmodels: [{model: /x}]\n"
    for name, why in [
        ("fisher", "is a branchmerge method, not mergekit's"),
        ("frankenmerge", "merge_method 'frankenmerge' is not one we run"),
    ]:
        with pytest.raises(RecipeError, match=why) as e:
            mergekit.from_mergekit(_yaml(tmp_path, f"merge_method: {name}\n{body}"))
        assert "supported from mergekit YAML: [" in str(e.value) and "'ties'" in str(e.value)
    if "nearswap" not in METHODS:
        with pytest.raises(RecipeError, match="mergekit's 'nearswap' has no implementation here yet"):
            mergekit.from_mergekit(_yaml(tmp_path, f"merge_method: nearswap\n{body}"))

        class Nearswap(Method):
            name = "nearswap"
            needs_base = True

        monkeypatch.setitem(METHODS, "nearswap", Nearswap())
    assert "nearswap" in mergekit.supported() and "fisher" not in mergekit.supported()
    step = mergekit.from_mergekit(_yaml(tmp_path, f"merge_method: nearswap\n{body}"))["steps"][0]
    assert step["method"] == "nearswap" and step["base"] == "b" and step["inputs"] == ["x"]


def test_dtype_is_compute_dtype_and_out_dtype_defaults_to_it(tmp_path):
    """mergekit's `dtype` is the compute dtype, `out_dtype` the written one (default `dtype`); no
    `dtype`: the stored one. Guards against the old mapping of `dtype` to the output dtype only."""
    from branchmerge.merge.mergekit import from_mergekit

    body = "merge_method: linear\nmodels: [{model: /a, parameters: {weight: 1}}]\n"
    mk = from_mergekit(_yaml(tmp_path, body + "dtype: bfloat16\n"))
    assert (mk["compute_dtype"], mk["out_dtype"]) == ("bfloat16", "bfloat16")
    mk = from_mergekit(_yaml(tmp_path, body + "dtype: bfloat16\nout_dtype: float32\n"))
    assert (mk["compute_dtype"], mk["out_dtype"]) == ("bfloat16", "float32")
    assert from_mergekit(_yaml(tmp_path, body))["compute_dtype"] is None


def test_chat_template_and_written_dtype_reach_the_output(inputs, tmp_path):
    """`chat_template: auto` copies the inputs' template into the output's tokenizer_config.json and
    config.json states the written dtype. Guards against a config.json still saying float32 over
    bf16 weights (planted: the copied config kept the input's dtype)."""
    from branchmerge.merge.run import run

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for m in ("base", "m1"):
        (inputs / "fp32" / m / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    yml = _yaml(
        tmp_path,
        f"merge_method: arcee_fusion\nbase_model: {inputs}/fp32/base\nmodels: [{{model: {inputs}/fp32/m1}}]\n"
        "dtype: bfloat16\nchat_template: auto\n",
    )
    out = tmp_path / "out"
    run(
        compose(
            "merge",
            [f"from_mergekit={yml}", f"output_dir={out}", "options.progress=false"],
            run_dir=tmp_path / "r",
        )
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_stacked_and_union_outputs_load_and_generate_with_transformers(inputs, tmp_path):
    """A layer-stacked output (m1's layers 0-1, m2's 1, base's 0) and a union-vocabulary output load
    with transformers and generate; config.json states 4 layers (and, where the inputs state
    layer_types, those of the source layers, in order) and the union's 19 rows; the union tokenizer
    encodes every input's added token to its own id. Guards against a config that keeps the inputs'
    layer count (planted: the model loaded 2 layers and ignored layers 2-3), layer_types taken from
    the output index instead of the source layer (planted: fails the order) and a union tokenizer not
    written (planted: the copied 16-token tokenizer stayed)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    stacked = _merge("passthrough_slices__fp32__float32", inputs, tmp_path / "s")
    assert json.loads((stacked / "config.json").read_text())["num_hidden_layers"] == 4
    typed = tmp_path / "typed"
    for m in ("base", "m1", "m2"):  # the same inputs, their config.json stating per-layer types
        shutil.copytree(inputs / "fp32" / m, typed / "fp32" / m)
        cfg = json.loads((typed / "fp32" / m / "config.json").read_text())
        cfg["layer_types"] = [f"{m}_layer0", f"{m}_layer1"]
        (typed / "fp32" / m / "config.json").write_text(json.dumps(cfg))
    out = _merge("passthrough_slices__fp32__float32", typed, tmp_path / "t")
    assert json.loads((out / "config.json").read_text())["layer_types"] == [
        "m1_layer0",
        "m1_layer1",
        "m2_layer1",
        "base_layer0",
    ]
    union = _merge("tokenizer_union__tok__float32", inputs, tmp_path / "u")
    assert json.loads((union / "config.json").read_text())["vocab_size"] == 19
    tok = AutoTokenizer.from_pretrained(str(union))
    assert [tok.convert_tokens_to_ids(t) for t in ("<a>", "<b>", "<c>")] == [16, 17, 18]
    for folder in (stacked, union):
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        assert model.config.num_hidden_layers == (4 if folder == stacked else 2)
        out = model.generate(torch.tensor([[0, 1, 2]]), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 7) and int(out.max()) < model.config.vocab_size


def test_slice_and_vocabulary_errors_name_the_problem_and_the_fix(inputs, tmp_path):
    """Bad slices and mismatched vocabularies fail before any tensor is written, naming the file,
    key or tensor and the fix. Guards against the old blanket 'slices are not supported' and against
    a vocabulary mismatch that does not say how to merge it (planted: the error without the
    `tokenizer_source` hint fails)."""
    from branchmerge.errors import CheckpointError, MergeRecipeError

    def merge(body: str):
        yml = _yaml(tmp_path, body)
        out = tmp_path / "out"
        cfg = compose(
            "merge",
            [f"from_mergekit={yml}", f"output_dir={out}", "options.progress=false"],
            run_dir=tmp_path / "r",
        )
        from branchmerge.merge.run import run

        run(cfg)

    fp = inputs / "fp32"
    with pytest.raises(CheckpointError, match=r"layer_range \[1, 3\] of 'm1' passes its 2 layers"):
        merge(
            f"merge_method: passthrough\nslices: [{{sources: [{{model: {fp}/m1, layer_range: [1, 3]}}]}}]\n"
        )
    with pytest.raises(MergeRecipeError, match=r"slices\[0\]: task_arithmetic needs the base model among"):
        merge(
            f"merge_method: task_arithmetic\nbase_model: {fp}/base\n"
            f"slices: [{{sources: [{{model: {fp}/m1, layer_range: [0, 2]}}]}}]\n"
        )
    with pytest.raises(MergeRecipeError, match="same number of layers"):
        merge(
            f"merge_method: linear\nslices: [{{sources: [{{model: {fp}/m1, layer_range: [0, 2]}}, "
            f"{{model: {fp}/m2, layer_range: [0, 1]}}]}}]\n"
        )
    tok = inputs / "tok"
    with pytest.raises(CheckpointError) as e:
        merge(f"merge_method: linear\nmodels: [{{model: {tok}/base}}, {{model: {tok}/t1}}]\n")
    msg = str(e.value)
    assert "'model.embed_tokens.weight' has shape [18, 16]" in msg and "tokenizer_source: union" in msg
    assert not (tmp_path / "out").exists()
