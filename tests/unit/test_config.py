"""Configs are code: every primary config and overlay composes and validates; mistakes name the key."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from branchmerge.config import ConfigError, validate
from branchmerge.config.schema import DistillConfig, ModelConfig
from tests.conftest import CONF, compose, load_model_entry

SCHEMAS = {"distill": DistillConfig}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def _primary_for(experiment: str) -> str:
    head = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    return next(name for name in SCHEMAS if f"python {name}.py" in head)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_primary_configs_compose_and_validate(name):
    validate(compose(name), SCHEMAS[name])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_overlay_composes_and_validates(experiment):
    primary = _primary_for(experiment)
    validate(compose(primary, [f"+experiment={experiment}"]), SCHEMAS[primary])


@pytest.mark.parametrize("model", MODELS)
def test_every_model_entry_validates(model):
    cfg = load_model_entry(model)
    validate(cfg, ModelConfig)
    assert (cfg.path is None) != (cfg.arch is None)  # a checkpoint, or an architecture to build


def test_misspelt_key_in_a_config_file_names_the_key():
    cfg = compose("distill", ["+experiment=toy_data", "+toy.vocab_sise=512", "+teacher.temprature=0.1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, DistillConfig)
    msg = str(e.value)
    assert "toy.vocab_sise: unknown key; did you mean 'toy.vocab_size'?" in msg
    assert "teacher.temprature: unknown key; did you mean 'teacher.temperature'?" in msg
    assert len(e.value.problems) == 2  # every problem at once


def test_wrong_type_names_the_key():
    cfg = compose("distill", ["+experiment=toy_data", "toy.seed=abc", "toy.splits.test=many"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, DistillConfig)
    assert any(p.startswith("toy.seed: expected int, got 'abc'") for p in e.value.problems)
    assert any(p.startswith("toy.splits.test: expected int") for p in e.value.problems)


def test_bad_choice_names_the_key_and_choices():
    cfg = compose("distill", ["+experiment=toy_data", "teacher.name=gpt"])
    with pytest.raises(ConfigError, match=r"teacher.name: 'gpt' is not one of \['toy'\]"):
        validate(cfg, DistillConfig)


def test_misspelt_override_on_the_command_line_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="vocab_sise"):
        compose("distill", ["+experiment=toy_data", "toy.vocab_sise=512"])


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="teacher"):
        compose("distill", ["teacher=nonexistent"])


def test_every_output_goes_under_paths_output_dir(tmp_path):
    cfg = compose("distill", ["+experiment=toy_data", f"paths.output_dir={tmp_path}"])
    assert Path(cfg.output_dir).is_relative_to(tmp_path)
    assert Path(cfg.paths.toy_dir).is_relative_to(tmp_path)
