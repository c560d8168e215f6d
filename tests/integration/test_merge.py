"""The merge engine end to end on pico checkpoints: real safetensors in and out, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.io import Checkpoint, CheckpointError
from branchmerge.merge.recipe import RecipeError, parse_steps
from tests.conftest import ROOT, load_model_entry


def _variant(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'branch' of src: every tensor plus seeded Gaussian noise at `scale` of its RMS."""
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    out = {
        k: v + scale * v.float().pow(2).mean().sqrt() * torch.randn(v.shape, generator=g)
        for k, v in sd.items()
    }
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def picos(tmp_path_factory, toy_world) -> dict[str, Path]:
    from branchmerge.models import build_model, load_tokenizer

    root = tmp_path_factory.mktemp("picos")
    cfg = load_model_entry("pico_untied", toy_world)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return {
        "base": root / "base",
        **{
            n: _variant(root / "base", root / n, i)
            for i, n in enumerate(("math", "code", "science"), start=1)
        },
    }


def _steps(raw):
    return parse_steps(raw, {"base", "math", "code", "science"})


def _opts(**kw):
    return MergeOptions(progress=False, **kw)


ALL_METHODS = [
    {"method": "linear", "inputs": ["math", "code", "science"]},
    {"method": "task_arithmetic", "base": "base", "inputs": ["math", "code"], "params": {"weight": 0.5}},
    {"method": "ties", "base": "base", "inputs": ["math", "code", "science"], "params": {"density": 0.5}},
    {"method": "dare_linear", "base": "base", "inputs": ["math", "code"], "params": {"density": 0.5}},
    {"method": "dare_ties", "base": "base", "inputs": ["math", "code"], "params": {"density": 0.5}},
    {"method": "slerp", "inputs": ["math", "code"], "params": {"t": [0.2, 0.8]}},
    {"method": "arcee_fusion", "base": "science", "inputs": ["math"]},
    {"method": "importance_fusion", "base": "base", "inputs": ["math", "code", "science"]},
    {"method": "model_stock", "base": "base", "inputs": ["math", "code", "science"]},
]


@pytest.mark.parametrize("raw", ALL_METHODS, ids=lambda r: r["method"])
def test_every_method_writes_a_loadable_model(picos, tmp_path, raw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    record = merge(picos, _steps([{"name": "m", **raw}]), out, _opts())
    assert set(record["inputs"]) >= {i if isinstance(i, str) else i["model"] for i in raw["inputs"]}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    prov = json.loads((out / "merge_provenance.json").read_text())
    assert all(len(h) == 32 for inp in prov["inputs"].values() for h in inp["files"].values())


def test_engine_never_instantiates_a_model(picos, tmp_path, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("the merge engine must not instantiate models")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", boom)
    merge(
        picos,
        _steps([{"name": "m", "method": "linear", "inputs": ["math", "code"]}]),
        tmp_path / "o",
        _opts(),
    )


def test_chain_equals_two_separate_merges_and_intermediates_stay_in_memory(picos, tmp_path):
    chain = _steps(
        [
            {"name": "ms", "method": "arcee_fusion", "base": "science", "inputs": ["math"]},
            {"name": "final", "method": "arcee_fusion", "base": "code", "inputs": ["ms"]},
        ]
    )
    merge(picos, chain, tmp_path / "chain", _opts())
    assert not (tmp_path / "chain" / "intermediate").exists()
    merge(
        picos,
        _steps([{"name": "ms", "method": "arcee_fusion", "base": "science", "inputs": ["math"]}]),
        tmp_path / "ms",
        _opts(),
    )
    two = parse_steps(
        [{"name": "final", "method": "arcee_fusion", "base": "code", "inputs": ["ms"]}], {"code", "ms"}
    )
    merge({"code": picos["code"], "ms": tmp_path / "ms"}, two, tmp_path / "two", _opts())
    a, b = (
        load_file(tmp_path / "chain" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    chain[0].save = True
    merge(picos, chain, tmp_path / "saved", _opts())
    inter = load_file(tmp_path / "saved" / "intermediate" / "ms" / "model.safetensors")
    ms = load_file(tmp_path / "ms" / "model.safetensors")
    assert all(torch.equal(inter[k], ms[k]) for k in ms)


def test_row_chunks_and_shards_do_not_change_the_result(picos, tmp_path):
    steps = _steps(
        [
            {
                "name": "m",
                "method": "linear",
                "inputs": ["math", "code", "science"],
                "params": {"weight": {"embed": 2.0, "default": 1.0}},
            }
        ]
    )
    merge(picos, steps, tmp_path / "whole", _opts())
    merge(picos, steps, tmp_path / "parts", _opts(chunk_elements=1000, max_shard_bytes=100_000))
    assert len(list((tmp_path / "parts").glob("model-*-of-*.safetensors"))) > 1
    whole = Checkpoint(tmp_path / "whole")
    parts = Checkpoint(tmp_path / "parts")
    assert all(torch.equal(whole.tensor(n), parts.tensor(n)) for n in whole.names)


def test_per_layer_and_per_module_parameters(picos, tmp_path):
    from branchmerge.merge.recipe import resolve_value

    assert resolve_value([0.0, 1.0], "model.layers.0.mlp.up_proj.weight", 2) == 0.0
    assert resolve_value([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 2) == 1.0
    assert resolve_value([0.0, 0.5, 1.0], "model.layers.1.self_attn.q_proj.weight", 3) == 0.5
    assert (
        resolve_value({"self_attn": 0.3, "default": 0.9}, "model.layers.0.self_attn.q_proj.weight", 2) == 0.3
    )
    assert resolve_value({"self_attn": 0.3, "default": 0.9}, "model.layers.0.mlp.up_proj.weight", 2) == 0.9
    merge(
        picos,
        _steps(
            [
                {
                    "name": "m",
                    "method": "slerp",
                    "inputs": ["math", "code"],
                    "params": {"t": {"self_attn": 0.0, "default": 1.0}},
                }
            ]
        ),
        tmp_path / "o",
        _opts(),
    )
    out, math_, code = (
        load_file(p / "model.safetensors") for p in (tmp_path / "o", picos["math"], picos["code"])
    )
    assert torch.allclose(
        out["model.layers.0.self_attn.q_proj.weight"], math_["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.allclose(out["model.layers.0.mlp.up_proj.weight"], code["model.layers.0.mlp.up_proj.weight"])


# ---- errors -----------------------------------------------------------------------------------------


def _broken(picos, tmp_path, name, edit) -> dict[str, Path]:
    bad = tmp_path / name
    shutil.copytree(picos["code"], bad)
    edit(bad)
    return {**picos, "code": bad}


def _linear(models, tmp_path):
    merge(
        models,
        _steps([{"name": "m", "method": "linear", "inputs": ["math", "code"]}]),
        tmp_path / "o",
        _opts(),
    )


def test_mismatched_shape_names_tensor_and_file(picos, tmp_path):
    def edit(d):
        sd = load_file(d / "model.safetensors")
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
        save_file(sd, d / "model.safetensors")

    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape"
    ):
        _linear(_broken(picos, tmp_path, "shape", edit), tmp_path)


def test_mismatched_vocabulary(picos, tmp_path):
    def edit(d):
        sd = load_file(d / "model.safetensors")
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:-64]
        save_file(sd, d / "model.safetensors")

    with pytest.raises(CheckpointError, match="vocabularies differ"):
        _linear(_broken(picos, tmp_path, "vocab", edit), tmp_path)


def test_mismatched_architecture_and_tying(picos, tmp_path):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_hidden_layers"] = 3
        cfg["tie_word_embeddings"] = True
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(CheckpointError) as e:
        _linear(_broken(picos, tmp_path, "arch", edit), tmp_path)
    assert "num_hidden_layers differs" in str(e.value) and "tied vs untied embeddings" in str(e.value)


def test_missing_shard_and_corrupt_header(picos, tmp_path):
    def sharded(d):
        (d / "model.safetensors").unlink()
        sd = load_file(picos["code"] / "model.safetensors")
        names = sorted(sd)
        save_file({k: sd[k] for k in names[:5]}, d / "model-00001-of-00002.safetensors")
        wm = {k: "model-00001-of-00002.safetensors" for k in names[:5]}
        wm.update({k: "model-00002-of-00002.safetensors" for k in names[5:]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors is missing"):
        _linear(_broken(picos, tmp_path, "shard", sharded), tmp_path)

    def corrupt(d):
        raw = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])

    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        _linear(_broken(picos, tmp_path, "corrupt", corrupt), tmp_path)


def test_nan_in_an_input(picos, tmp_path):
    def edit(d):
        sd = load_file(d / "model.safetensors")
        sd["model.norm.weight"][3] = float("nan")
        save_file(sd, d / "model.safetensors")

    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' contains NaN or Inf"):
        _linear(_broken(picos, tmp_path, "nan", edit), tmp_path)
    assert not (tmp_path / "o").exists()  # nothing half-written at the target


def test_recipe_errors_are_collected():
    with pytest.raises(RecipeError) as e:
        _steps(
            [
                {"name": "a", "method": "ties", "inputs": ["math", "kode"], "params": {"densty": 0.5}},
                {"name": "b", "method": "slerp", "inputs": ["a"]},
                {"name": "c", "method": "tie", "inputs": ["a"]},
            ]
        )
    msg = str(e.value)
    assert (
        "ties needs a `base:`" in msg
        and "'kode' is neither a model nor an earlier step; did you mean 'code'" in msg
    )
    assert "unknown parameter 'densty' for ties; did you mean 'density'" in msg
    assert "slerp takes 2 input model(s), got 1" in msg and "unknown merge method 'tie'" in msg


# ---- the command line --------------------------------------------------------------------------------


def _cli(*args, check=True, **kw):
    proc = subprocess.run(
        [sys.executable, "merge.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-4000:])
    return proc


def test_cli_single_step_overrides_and_mergekit_yaml(picos, tmp_path):
    out1 = tmp_path / "cli"
    args = [
        "method=ties",
        f"base={picos['base']}",
        f"inputs=[{picos['math']},{picos['code']}]",
        "+params.density=0.5",
        f"output_dir={out1}",
        f"paths.output_dir={tmp_path}",
        "options.progress=false",
    ]
    _cli(*args)
    again = _cli(*args)
    assert "already holds this merge" in again.stdout + again.stderr  # same recipe, same input bytes: reused
    other = _cli(*args[:3], "+params.density=0.6", *args[4:])
    assert "merging again" in other.stdout + other.stderr
    _cli(*args)
    prov = out1 / "merge_provenance.json"  # made by an older engine whose values differ: not reused
    prov.write_text(json.dumps({**json.loads(prov.read_text()), "engine_version": 1}))
    older = _cli(*args)
    assert "merging again" in older.stdout + older.stderr
    mk = tmp_path / "mk.yml"
    mk.write_text(f"""merge_method: ties
base_model: {picos["base"]}
models:
  - model: {picos["math"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {picos["code"]}
    parameters: {{weight: 1.0, density: 0.5}}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
""")
    out2 = tmp_path / "mk"
    _cli(
        f"from_mergekit={mk}", f"output_dir={out2}", f"paths.output_dir={tmp_path}", "options.progress=false"
    )
    a, b = load_file(out1 / "model.safetensors"), load_file(out2 / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = _cli(
        "method=tie",
        f"inputs=[{picos['math']}]",
        f"output_dir={tmp_path / 'x'}",
        f"paths.output_dir={tmp_path}",
        check=False,
    )
    assert bad.returncode != 0 and "unknown merge method 'tie'" in bad.stderr


def test_method_config_selected_with_one_token_runs_end_to_end(picos, tmp_path):
    """`merge=dare_ties` (conf/merge/dare_ties.yaml) + single-step keys: the same bytes as the engine
    given that file's defaults and the override directly."""
    out = tmp_path / "cfg"
    _cli(
        "merge=dare_ties",
        f"base={picos['base']}",
        f"inputs=[{picos['math']},{picos['code']}]",
        "params.density=0.5",
        f"output_dir={out}",
        f"paths.output_dir={tmp_path}",
        "options.progress=false",
    )
    step = {"name": "s", "method": "dare_ties", "base": "base", "inputs": ["math", "code"]}
    step["params"] = {"density": 0.5, "weight": 1.0, "normalize": True, "lambda_": 1.0, "seed": 0}
    models = {k: picos[k] for k in ("base", "math", "code")}
    merge(models, parse_steps([step], set(models)), tmp_path / "direct", _opts())
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((out / "merge_provenance.json").read_text())["recipe"]["steps"][0]["method"] == "dare_ties"
    )


def _synthetic(root: Path, n_tensors: int, rows: int, cols: int, seed: int) -> Path:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {f"model.layers.{i}.w": torch.randn(rows, cols, generator=g) for i in range(n_tensors)},
        root / "model.safetensors",
    )
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": n_tensors}))
    return root


# The peak is VmHWM after resetting it to the current RSS (`5 > /proc/self/clear_refs`), not ru_maxrss:
# a child started by fork+exec from pytest reports the parent's larger peak there, so the growth read
# 0 MB and an engine holding a whole 384 MB input in memory passed.
PEAK_SCRIPT = r"""
import json, sys
from pathlib import Path
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.recipe import parse_steps
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
a = json.loads(sys.argv[1])
models = {k: Path(v) for k, v in a["models"].items()}
steps = parse_steps([{"name": "m", "method": a["method"], "base": a.get("base"), "inputs": a["inputs"]}], set(models))
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS:")
merge(models, steps, Path(a["out"]), MergeOptions(progress=False))
after = kb("VmHWM:")
print(json.dumps({"before_kb": before, "after_kb": after}))
"""


BIG = (24, 2048, 2048)  # 24 tensors of 16 MB: 384 MB per model


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("big")
    return {k: str(_synthetic(root / k, *BIG, s)) for s, k in enumerate(("b", "x", "y", "z"))}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "ties", "arcee_fusion"])
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path, method, big_models):
    """Bound: growth of peak RSS <= 12 x the largest tensor (fp32) + 160 MB, for three 384 MB inputs.
    Guards against an engine that materialises a whole input (planted: `ckpt.tensor` for every name up
    front; 384 MB, 2.2x the bound)."""
    _, rows, cols = BIG
    models = big_models
    largest = rows * cols * 4
    args = {"models": models, "method": method, "out": str(tmp_path / "out")}
    if method == "arcee_fusion":
        args.update(base="b", inputs=["x"])
    else:
        args.update(base="b" if method == "ties" else None, inputs=["x", "y", "z"])
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (r["after_kb"] - r["before_kb"]) * 1024
    bound = 12 * largest + 160 * 2**20
    inputs_total = sum(Path(m, "model.safetensors").stat().st_size for m in models.values())
    assert growth <= bound < inputs_total, (method, growth / 2**20, bound / 2**20)


@pytest.mark.slow
def test_sigkill_leaves_nothing_and_a_rerun_gives_the_same_bytes(tmp_path):
    models = {k: _synthetic(tmp_path / k, 40, 1024, 1024, s) for s, k in enumerate(("b", "x"))}
    args = {
        "models": {k: str(v) for k, v in models.items()},
        "method": "arcee_fusion",
        "base": "b",
        "inputs": ["x"],
    }
    clean = tmp_path / "clean"
    subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps({**args, "out": str(clean)})],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    target = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps({**args, "out": str(target)})],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        tmps = list(tmp_path.glob("killed.tmp-*/model.safetensors"))
        if tmps and tmps[0].stat().st_size > 10 * 2**20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()  # the partial output sits only in a .tmp folder beside it
    subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps({**args, "out": str(target)})],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert not list(tmp_path.glob("killed.tmp-*"))  # the stale partial folder was cleaned up
    assert (target / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()
    assert os.path.getsize(target / "model.safetensors") > 40 * 1024 * 1024 * 4


def test_fisher_merge_with_importance_estimated_on_a_calibration_set(picos, tmp_path, toy_world):
    from branchmerge.merge.importance import estimate_fisher

    models = {}
    for name in ("math", "code"):
        models[name] = tmp_path / name
        shutil.copytree(picos[name], models[name])
        fisher = estimate_fisher(models[name], toy_world / "data" / name / "train.jsonl", samples=4)
        assert set(fisher) == set(load_file(models[name] / "model.safetensors"))
        save_file(fisher, models[name] / "fisher.safetensors")
    merge(
        models,
        parse_steps([{"name": "f", "method": "fisher", "inputs": ["math", "code"]}], set(models)),
        tmp_path / "out",
        _opts(),
    )
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(models["math"] / "model.safetensors"), load_file(models["code"] / "model.safetensors")
    fa, fb = (
        load_file(models["math"] / "fisher.safetensors"),
        load_file(models["code"] / "fisher.safetensors"),
    )
    k = "model.layers.0.mlp.up_proj.weight"
    expect = torch.where(
        fa[k] + fb[k] > 1e-12,
        (fa[k] * a[k] + fb[k] * b[k]) / (fa[k] + fb[k]).clamp_min(1e-12),
        (a[k] + b[k]) / 2,
    )
    assert torch.allclose(out[k], expect, atol=1e-6)
    with pytest.raises(CheckpointError, match="no Fisher importance"):
        merge(
            {"math": picos["math"], "code": picos["code"]},
            parse_steps([{"name": "f", "method": "fisher", "inputs": ["math", "code"]}], {"math", "code"}),
            tmp_path / "out2",
            _opts(),
        )


def test_recipe_slices_stack_layers_renumbered_and_the_output_generates(picos, tmp_path):
    """A recipe step with `slices` (no mergekit YAML): output layers = math's 0-1, then code's 1
    (scaled 0.5 in o_proj only), each tensor bit-equal to its source layer's; embeddings from the
    first slice's model, final norm / lm_head from the last's; the output loads and generates with
    transformers. Guards against layers not renumbered or taken from the wrong source index (planted:
    the source index a + i read as the output index k: layer 2 came from code's layer 2, absent) and
    bad slices accepted (each problem of a bad recipe named)."""
    from transformers import AutoModelForCausalLM

    steps = _steps(
        [
            {
                "name": "stacked",
                "method": "passthrough",
                "slices": [
                    {"inputs": [{"model": "math", "layer_range": [0, 2]}]},
                    {
                        "inputs": [
                            {"model": "code", "layer_range": [1, 2], "scale": {"o_proj": 0.5, "default": 1.0}}
                        ]
                    },
                ],
            }
        ]
    )
    out = tmp_path / "stacked"
    merge({k: picos[k] for k in ("math", "code")}, steps, out, _opts())
    got = load_file(out / "model.safetensors")
    math, code = (
        load_file(picos["math"] / "model.safetensors"),
        load_file(picos["code"] / "model.safetensors"),
    )
    layer2 = {k: v for k, v in got.items() if ".layers.2." in k}
    assert layer2 and len(got) == len(math) + len(layer2)
    for k, v in got.items():
        if ".layers.2." in k:
            src = code[k.replace(".layers.2.", ".layers.1.")]
            assert torch.equal(v, src * 0.5 if "o_proj" in k else src), k
        else:
            tail = "layers" not in k and "embed" not in k  # final norm, lm_head: the last slice's model
            assert torch.equal(v, code[k] if tail else math[k]), k
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    with pytest.raises(RecipeError) as e:
        _steps([{"name": "s", "method": "ties", "slices": [{"inputs": [{"model": "math"}], "weights": 1}]}])
    msg = str(e.value)
    assert "layer_range: [a, b]" in msg and "unknown key 'weights'" in msg and "ties needs a `base:" in msg
