"""Every registered merge method has conf/merge/<name>.yaml: selecting it is one token
(`python merge.py merge=ties ...`), and the file's parameters are the method's own, with its defaults."""

import pytest

from branchmerge.config import validate
from branchmerge.config.schema import MergeConfig
from branchmerge.merge.methods import METHODS
from branchmerge.merge.recipe import parse_steps
from tests.conftest import CONF, compose

FILES = sorted(p.stem for p in (CONF / "merge").glob("*.yaml"))


def test_every_method_has_a_config_and_every_config_a_method():
    assert sorted(METHODS) == FILES


@pytest.mark.parametrize("name", FILES)
def test_method_config_composes_validates_and_states_the_defaults(name):
    m = METHODS[name]
    inputs = ["a", "b"][: m.max_models or 2]
    overrides = [f"merge={name}", f"inputs=[{','.join(inputs)}]"] + (["base=c"] if m.needs_base else [])
    cfg = validate(compose("merge", overrides), MergeConfig)
    assert cfg.method == name
    assert dict(cfg.params) == {**m.model_params, **m.global_params}, "the file states every default"
    step = {"name": "s", "method": cfg.method, "base": cfg.base, "inputs": list(cfg.inputs)}
    parse_steps([{**step, "params": dict(cfg.params)}], {"a", "b", "c"})  # a valid recipe step


def test_a_method_config_takes_command_line_overrides():
    cfg = compose("merge", ["merge=ties", "inputs=[a,b]", "base=c", "params.density=0.3"])
    assert cfg.method == "ties" and cfg.params.density == 0.3 and cfg.params.normalize is True
    assert compose("merge").method is None  # nothing selected: the single-step keys stay empty


def test_single_step_command_line_takes_lines():
    """Guards against `lines=` being accepted by the config but dropped on the single-step path (the
    merge would run without LiNeS): the step handed to the executor carries {alpha, beta}, and a
    method without a base refuses it."""
    from branchmerge.merge.run import recipe_from_config

    over = ["merge=task_arithmetic", "inputs=[a,b]", "base=c", "lines={alpha: 0.5, beta: 0.5}"]
    cfg = validate(compose("merge", over), MergeConfig)
    _, steps, _, recipe = recipe_from_config(cfg)
    assert steps[0].lines == {"alpha": 0.5, "beta": 0.5} and recipe["steps"][0]["lines"] == steps[0].lines
    bad = validate(
        compose("merge", ["merge=linear", "inputs=[a,b]", "lines={alpha: 1, beta: 0}"]), MergeConfig
    )
    with pytest.raises(Exception, match="has no base"):
        recipe_from_config(bad)
