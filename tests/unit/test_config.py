"""Configs are code: every primary config and overlay composes and validates; mistakes name the key."""

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from branchmerge.config import ConfigError, validate
from branchmerge.config.schema import DistillConfig, EvalConfig, MergeConfig, ModelConfig, TrainConfig
from tests.conftest import CONF, compose, load_model_entry

SCHEMAS = {"distill": DistillConfig, "train": TrainConfig, "merge": MergeConfig}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def _primary_for(experiment: str) -> str:
    """The entry point whose command in the overlay's header runs this overlay."""
    import re

    head = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    m = re.search(rf"python (\w+)\.py (?:(?!python)[^\n])*\+experiment=[\w,]*\b{experiment}\b", head)
    assert m, f"conf/experiment/{experiment}.yaml must open with the command that runs it"
    return m.group(1)


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
    with pytest.raises(
        ConfigError, match=r"teacher.name: 'gpt' is not one of \['toy', 'openai', 'vllm', 'hf'\]"
    ):
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


PAPER_RECIPES = {  # docs/method.md, Setup: (epochs, schedule, global batch, cross-document attention)
    "math_branch": (5, "constant_with_warmup", 96, True),
    "code_branch": (15, "constant_with_warmup", 96, False),
    "science_branch": (5, "cosine", 32, False),
}


@pytest.mark.parametrize("experiment", sorted(PAPER_RECIPES))
def test_32b_branch_configs_are_the_papers_recipe(experiment):
    cfg = validate(compose("train", [f"+experiment={experiment}"]), TrainConfig)
    epochs, schedule, batch, cross = PAPER_RECIPES[experiment]
    assert cfg.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" and cfg.model.dtype == "bfloat16"
    assert (cfg.trainer.epochs, cfg.optim.schedule, cfg.trainer.global_batch_size) == (
        epochs,
        schedule,
        batch,
    )
    assert cfg.data.cross_document_attention is cross and cfg.data.max_length == 16384
    assert cfg.data.template == "chatml" and cfg.seed == 42
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.eps) == (1e-5, [0.9, 0.95], 1e-8)
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.warmup_ratio) == (0.01, 1.0, 0.1)
    assert cfg.strategy.name == "fsdp2" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.gradient_checkpointing and cfg.trainer.micro_batch_size == 1
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    assert batch % (cfg.trainer.micro_batch_size * world) == 0  # 96 = 3 x 32 ranks, 32 = 1 x 32


def test_cfg_job_prints_the_recipe():
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run(
        [sys.executable, "train.py", "+experiment=math_branch", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for line in (
        "lr: 1.0e-05",
        "global_batch_size: 96",
        "max_length: 16384",
        "epochs: 5",
        "name: fsdp2",
        "path: deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    ):
        assert line in out, line


def test_slurm_launcher_config_composes():
    cfg = compose("train", ["+experiment=math_branch", "hydra/launcher=slurm"], keep_hydra=True)
    assert cfg.hydra.launcher.nodes == 4 and cfg.hydra.launcher.tasks_per_node == 8


def test_every_merge_overlay_is_a_valid_recipe():
    from branchmerge.merge.recipe import parse_steps

    for exp in EXPERIMENTS:
        if _primary_for(exp) == "merge":
            cfg = validate(compose("merge", [f"+experiment={exp}"]), MergeConfig)
            steps = parse_steps([dict(s) for s in cfg.steps], set(cfg.models))
            assert steps[-1].name and all(s.method for s in steps), exp


@pytest.mark.parametrize("suite", ["toy", "paper", "smoke"])
def test_eval_config_and_every_suite_compose_and_validate(suite):
    cfg = validate(compose("eval", [f"eval={suite}", "model_path=/models/x/export"]), EvalConfig)
    assert cfg.run_name == f"x_{suite}" and cfg.eval.tasks
    if suite == "paper":
        n = {t.name: (t.n, t.temperature, t.top_p, t.max_gen_toks) for t in cfg.eval.tasks}
        assert n == {
            "aime24": (16, 0.6, 0.95, 32768),
            "livecodebench": (4, 0.6, 0.95, 32768),
            "gpqa_diamond": (4, 0.6, 0.95, 32768),
        }


HPARAMS = sorted(p.stem for p in (CONF / "hparams_search").glob("[!_]*.yaml"))


@pytest.mark.parametrize("search", HPARAMS)
def test_every_hparams_search_composes_with_its_experiment(search):
    """The command in each sweep config's header composes: sweeper, search space, trial folders."""
    from omegaconf import OmegaConf

    head = (CONF / "hparams_search" / f"{search}.yaml").read_text()
    m = re.search(rf"python merge\.py (\+experiment=\w+) \+hparams_search={search}\b", head)
    assert m, f"conf/hparams_search/{search}.yaml must open with the command that runs it"
    cfg = compose("merge", [m.group(1), f"+hparams_search={search}"], keep_hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.params, "a sweep needs a search space"
    for key in sweeper.params:  # every swept key exists in the experiment's recipe
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key
    assert cfg.eval is not None and cfg.score.sweep_name == search
    if "optuna" in search:
        assert sweeper.storage.startswith("sqlite:///") and sweeper.study_name == search
