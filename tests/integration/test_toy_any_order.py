"""Toy stages run in any order: a toy experiment that finds no toy world builds it first."""

from __future__ import annotations

import json

import pytest

from branchmerge.toy.build import wants_toy_world
from tests.conftest import compose


@pytest.mark.parametrize(
    ("config", "overrides", "wanted"),
    [
        ("train", ["+experiment=toy_math_branch"], True),
        ("distill", ["+experiment=toy_distill"], True),
        ("eval", ["eval=toy", "model_path=/m"], True),
        ("distill", ["+experiment=toy_data"], False),  # builds the world itself
        ("distill", ["+experiment=math_data"], False),
        ("eval", ["eval=paper", "model_path=/m"], False),
    ],
)
def test_which_configs_read_the_toy_world(config, overrides, wanted, tmp_path):
    """Guards against building the toy world for a real-data run, or not building it for a toy one."""
    cfg = compose(config, [f"paths.output_dir={tmp_path}", *overrides], run_dir=tmp_path / "run")
    assert wants_toy_world(cfg) is wanted


@pytest.mark.slow
def test_toy_distill_from_an_empty_output_dir_builds_the_world(toy_outputs):
    """Guards against a toy stage that stops when `python distill.py +experiment=toy_data` was not run
    first (with `ensure_world` disabled this run fails with 'the toy teacher needs a toy world').
    `toy_outputs` is that run: `python distill.py +experiment=toy_distill` on an empty output dir."""
    world = json.loads((toy_outputs / "toy_world" / "manifest.json").read_text())
    assert set(world["sizes"]) == {"math", "code", "science"}
    stats = json.loads((toy_outputs / "toy_distill" / "manifest.json").read_text())["stats"]
    assert all(stats[d]["kept"] > 0 for d in ("math", "code", "science"))
