"""The merge-method panel's plan: which methods run on which inputs, and how a one-model method chains."""

from __future__ import annotations

from experiments.merge_methods_panel import run as panel


def test_one_model_methods_chain_in_the_tinyr1_order():
    """Guards against chaining Arcee Fusion onto the wrong base: the released recipe is
    ((math ⊕ science, base science) ⊕ code, base code), each step onto the next branch."""
    steps = panel.plan(["math", "science", "code"], fisher=False)["arcee_fusion"]["steps"]
    assert [(s["base"], s["inputs"]) for s in steps] == [("science", ["math"]), ("code", ["step0"])]
    assert steps[-1]["name"] == "panel"
    args = panel.merge_args("arcee_fusion", {"steps": steps}, {"base": "/b"}, "/o")
    assert args[-1] == (
        "steps=[{name: step0, method: arcee_fusion, base: science, inputs: [math], params: {k: 1.5, seed: 0}}, "
        "{name: panel, method: arcee_fusion, base: code, inputs: [step0], params: {k: 1.5, seed: 0}}]"
    )


def test_methods_whose_inputs_cannot_be_met_are_left_out_with_a_reason():
    """Guards against running a 2-model method (slerp) on 3 branches or Fisher merging without Fisher
    files; a base-free method gets no base, a task-vector method gets the base student."""
    three = panel.plan(["math", "science", "code"], fisher=False)
    assert "2-2 models" in three["slerp"] and "fisher" in three["fisher"]
    two = panel.plan(["math", "science"], fisher=True)
    assert two["slerp"] == {"base": None, "inputs": ["math", "science"]}
    assert two["ties"] == {"base": "base", "inputs": ["math", "science"]}
    assert isinstance(two["fisher"], dict)
    args = panel.merge_args("ties", two["ties"], {"base": "/b", "math": "/m"}, "/o")
    assert "base=base" in args and "inputs=[math,science]" in args and "params.density=0.5" in args


def test_acm_gets_the_branches_calibration_records():
    """Guards against the panel running ACM without calibration rows (merge.py would stop: no
    per-layer coefficients): its merge reads each branch's own train split."""
    spec = panel.plan(["math", "science"], fisher=False)["acm"]
    assert spec == {"base": "base", "inputs": ["math", "science"]}
    files = [panel.CALIBRATION["toy"].format(out="/o", d=d) for d in ("math", "science")]
    args = panel.merge_args("acm", spec, {"base": "/b"}, "/m", files)
    assert (
        "calibration.files=[/o/toy_world/data/math/train.jsonl,/o/toy_world/data/science/train.jsonl]" in args
    )
    assert not any(a.startswith("calibration") for a in panel.merge_args("ties", spec, {}, "/m", files))
