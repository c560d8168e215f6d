"""Held-out splits: a toy val set is read only after checking it shares no prompt with test, the
real benchmarks have no val split, the harness records the file of the split it read, every toy
sweep selects on val and scores its winner on test, and winner picking / test columns in results."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from branchmerge.config import validate
from branchmerge.config.schema import EvalConfig, MergeConfig
from branchmerge.data import benchmarks as B
from branchmerge.data.records import Record, write_records
from branchmerge.errors import ConfigError, DataError
from tests.conftest import CONF, compose


def _rec(split: str, i: int, prompt: str) -> Record:
    return Record(
        id=f"toy-math-{split}-{i:06d}",
        domain="math",
        source="toy/math",
        messages=[{"role": "user", "content": prompt}],
        reference=str(i),
        metadata={"split": split},
    )


@pytest.fixture
def toy_dir(tmp_path):
    """A one-domain toy world: test prompts q0..q4, val prompts v0..v2 (disjoint)."""
    data = tmp_path / "data" / "math"
    write_records(data / "test.jsonl", [_rec("test", i, f"q{i}") for i in range(5)])
    write_records(data / "val.jsonl", [_rec("val", i, f"v{i}") for i in range(3)])
    return tmp_path


def test_load_toy_reads_the_split_asked_for(toy_dir):
    val = B.load_toy("math", str(toy_dir), split="val")["test"]
    assert [d["prompt"] for d in val] == ["v0", "v1", "v2"] and val[0]["id"] == "toy-math-val-000000"
    test = B.load_toy("math", str(toy_dir), limit=2)["test"]  # default: test
    assert [d["prompt"] for d in test] == ["q0", "q1"]


def test_val_set_sharing_a_prompt_with_test_is_refused(toy_dir):
    """Guards against selecting on test items through a val file that overlaps test (a stale or
    hand-edited world): planted by skipping check_val_disjoint, this test fails (val loads)."""
    val = toy_dir / "data" / "math" / "val.jsonl"
    write_records(val, [_rec("val", 0, "v0"), _rec("val", 1, "q3")])  # q3 is a test prompt
    with pytest.raises(DataError) as e:
        B.load_toy("math", str(toy_dir), split="val")
    msg = str(e.value)
    assert "\n" not in msg and str(val) in msg and str(val.with_name("test.jsonl")) in msg
    assert "1 prompt(s)" in msg and "python distill.py +experiment=toy_data toy.overwrite=true" in msg
    B.load_toy("math", str(toy_dir), split="test")  # test itself still loads


def test_val_without_its_test_file_cannot_be_checked(toy_dir):
    (toy_dir / "data" / "math" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="cannot be checked"):
        B.load_toy("math", str(toy_dir), split="val")


@pytest.mark.parametrize("index,task", [(0, "aime24"), (1, "livecodebench"), (2, "gpqa_diamond")])
def test_real_task_with_a_val_split_is_a_config_error(index, task):
    """Guards against a real benchmark silently scoring its test set when val was asked for: the
    config is refused before any model loads, naming the task (planted by removing
    EvalTaskConfig.problems, validation passes and this test fails)."""
    cfg = compose("eval", ["eval=paper", "model_path=/m/x", f"eval.tasks.{index}.split=val"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, EvalConfig)
    assert f"eval.tasks[{index}].split: task {task} has no val split" in str(e.value)
    loader = {
        "aime24": B.load_aime24,
        "livecodebench": B.load_livecodebench,
        "gpqa_diamond": B.load_gpqa_diamond,
    }
    with pytest.raises(ConfigError, match=f"task {task} has no val split"):
        loader[task](data_dir="/nowhere", split="val")  # the loaders refuse it too, before any file


def test_scored_merge_with_a_real_val_task_fails_validation():
    cfg = compose("merge", ["+experiment=toy_merge_ties", "eval=paper", "eval.tasks.0.split=val"])
    with pytest.raises(ConfigError, match="aime24 has no val split"):
        validate(cfg, MergeConfig)


def test_dataset_file_is_the_split_read(tmp_path):
    from branchmerge.eval.harness import _dataset_file

    tasks = [SimpleNamespace(name="toy_math", split="val"), SimpleNamespace(name="toy_code", split="test")]
    cfg = SimpleNamespace(toy_dir=str(tmp_path), data_dir="d", eval=SimpleNamespace(tasks=tasks))
    assert _dataset_file("toy_math", cfg) == tmp_path / "data" / "math" / "val.jsonl"
    assert _dataset_file("toy_code", cfg) == tmp_path / "data" / "code" / "test.jsonl"


HPARAMS = sorted(p.stem for p in (CONF / "hparams_search").glob("toy_*.yaml"))


@pytest.mark.parametrize("search", HPARAMS)
def test_every_toy_sweep_selects_on_val_and_scores_its_winner_on_test(search):
    """Guards against the winner's curse by default: a toy sweep whose suite reads test items."""
    from branchmerge.sweep.winner import ScoreWinnerOnTest, load_suite

    head = (CONF / "hparams_search" / f"{search}.yaml").read_text()
    experiment = re.search(r"python merge\.py (\+experiment=\w+)", head).group(1)
    overrides = [experiment, f"+hparams_search={search}"]
    checked = validate(compose("merge", overrides), MergeConfig)
    cfg = compose("merge", overrides, keep_hydra=True)
    assert {t.split for t in checked.eval.tasks} == {"val"}, checked.eval.name
    assert checked.score.test_eval == "toy"
    assert {t["split"] for t in load_suite(checked.score.test_eval)["tasks"]} == {"test"}
    assert cfg.hydra.callbacks.score_winner._target_.endswith(ScoreWinnerOnTest.__name__)
    assert "score.test_eval" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_val_suites_read_only_val():
    from branchmerge.sweep.winner import load_suite

    for name in ("toy_val", "toy_val_quick", "toy_val_tiny"):
        suite = load_suite(name)
        assert suite["name"] == name and {t["split"] for t in suite["tasks"]} == {"val"}
        assert {t["name"] for t in suite["tasks"]} == {"toy_math", "toy_code", "toy_science"}
    assert [t["limit"] for t in load_suite("toy_val")["tasks"]] == [None] * 3
    assert [t["limit"] for t in load_suite("toy_val_quick")["tasks"]] == [64] * 3


def test_a_val_suite_as_the_test_suite_is_refused():
    from branchmerge.sweep.winner import load_suite, require_split

    with pytest.raises(ConfigError, match="score.test_eval=toy_val_quick: task toy_math reads its val split"):
        require_split(load_suite("toy_val_quick"), "test", "score.test_eval")
    with pytest.raises(FileNotFoundError, match="score.test_eval=toyy: no suite"):
        load_suite("toyy")
