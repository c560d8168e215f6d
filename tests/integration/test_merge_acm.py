"""`python merge.py +experiment=toy_merge_acm` end to end, on tiny Qwen2 models and calibration records
made here: the activation pass, then the streaming merge, into a loadable HF folder that records the
coefficients it was merged with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.unit.test_merge_acm import LAYERS, records, tiny_models


@pytest.mark.slow  # a merge.py process: ~15 s
def test_toy_merge_acm_through_merge_py(tmp_path):
    """Guards against the experiment overlay or merge.py losing the calibration on the way (the merge
    would stop with "needs per-layer coefficients"), and against coefficients recorded but not applied
    (each tensor is checked against W = B + Σ_i c_iℓ Δ_i with the recorded c)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = tiny_models(tmp_path / "models")
    for domain in ("math", "science"):
        records(tmp_path / "toy" / "data" / domain / "train.jsonl", 40, domain)
    out = tmp_path / "merged"
    args = [
        "+experiment=toy_merge_acm",
        *(f"models.{k}={models[k]}" for k in ("base", "math", "science")),
        f"paths.toy_dir={tmp_path / 'toy'}",
        f"paths.output_dir={tmp_path}",
        f"output_dir={out}",
        "options.progress=false",
    ]
    proc = subprocess.run(
        [sys.executable, "merge.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    acm = json.loads((out / "merge_provenance.json").read_text())["acm"]
    assert acm["rows"] == 64 and acm["calibration"]["max_tokens"] == 256
    coef = {m: acm["pairs"][f"base->{m}"]["coef"] for m in ("math", "science")}
    assert all(len(c) == LAYERS and all(0.0 <= v <= 1.0 for v in c) for c in coef.values())
    got = load_file(out / "model.safetensors")
    sd = {m: load_file(models[m] / "model.safetensors") for m in ("base", "math", "science")}
    for name, w in got.items():
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        want = sd["base"][name].clone()
        for m, c in coef.items():
            want += (c[layer] if layer is not None else sum(c) / LAYERS) * (sd[m][name] - sd["base"][name])
        assert torch.allclose(w, want, atol=1e-6), name

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
