"""The Optuna sweep worker without merges: search space from Hydra syntax, samplers by name, the
study-wide trial budget, a dead worker's trial failed and retried (bounded), the Pareto front, and
the dependency pins (issue 17: no SQLAlchemy < 2 / alembic < 1.14, optuna >= 4)."""

from __future__ import annotations

import itertools
import random
import time
from importlib.metadata import version

import pytest

from branchmerge.report.sweep_plots import pareto_front
from branchmerge.sweep.optuna_sweep import DONE, WAIT, StudySpec, claim, open_study, summary
from branchmerge.sweep.search_space import grid_of, make_sampler, parse_space
from tests.conftest import ROOT

optuna = pytest.importorskip("optuna")


def test_search_space_from_hydra_syntax():
    """Bugs guarded: a log tag or an int cast lost, a range's stop taken as inclusive."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = parse_space(
        {
            "k": "interval(0.0, 4.0)",
            "lr": "tag(log, interval(1e-5, 1e-2))",
            "n": "int(interval(1, 8))",
            "d": "range(0.1, 0.9, 0.2)",
            "m": "choice(ties, dare_ties)",
            "w": "0.5,1.0",
            "seed": 3,
        },
        ["k=interval(1.0, 2.0)"],  # the command line wins over `params`
    )
    assert space["k"] == FloatDistribution(1.0, 2.0)
    assert space["lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["n"] == IntDistribution(1, 8)
    assert space["d"] == FloatDistribution(0.1, 0.7, step=0.2)
    assert space["m"] == CategoricalDistribution(["ties", "dare_ties"])
    assert space["w"] == CategoricalDistribution([0.5, 1.0])
    assert fixed == ["seed=3"]
    grid = grid_of({k: space[k] for k in ("d", "m", "w")})
    assert grid == {"d": [0.1, 0.3, 0.5, 0.7], "m": ["ties", "dare_ties"], "w": [0.5, 1.0]}
    with pytest.raises(ValueError, match=r"grid needs choice\(\) or range\(\) for \['k', 'lr'\]"):
        grid_of(space)


def test_samplers_by_name():
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for kind, cls in [("tpe", "TPESampler"), ("gp", "GPSampler"), ("cmaes", "CmaEsSampler")]:
        sampler = make_sampler({"type": kind, "seed": 0, "n_startup_trials": 2}, space, 1)
        assert type(sampler).__name__ == cls
    choices = {"c": optuna.distributions.CategoricalDistribution([1, 2])}
    grid = make_sampler({"type": "grid", "seed": 0, "n_startup_trials": 2}, choices, 1)
    assert type(grid).__name__ == "GridSampler"
    with pytest.raises(ValueError, match="cmaes optimises one objective"):
        make_sampler({"type": "cmaes"}, space, 3)
    with pytest.raises(ValueError, match="sampler.type='bayes'"):
        make_sampler({"type": "bayes"}, space, 1)


def _spec(tmp_path, **kw) -> StudySpec:
    base = dict(
        study_name="s",
        storage=f"journal:///{tmp_path}/study.journal",
        directions=["maximize"],
        n_trials=3,
        sampler={"type": "random", "seed": 0},
        heartbeat_interval=1,
        grace_period=1,
        max_retry=1,
        poll_interval=0.1,
    )
    return StudySpec(**{**base, **kw})


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_budget_dead_worker_retry_and_bound(tmp_path, storage):
    """n_trials first attempts, then WAIT while a trial runs, DONE when none does; a trial whose
    heartbeats stop is failed and its retry (same parameters) claimed first; a second death of the
    same trial is not retried (max_retry=1). Bugs guarded: a budget per worker instead of per
    study (a 4th first attempt), a worker leaving while a dead trial could still be retried."""
    url = f"sqlite:///{tmp_path}/s.db" if storage == "sqlite" else None
    spec = _spec(tmp_path, **({"storage": url} if url else {}))
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study = open_study(spec, space)
    a, b, c = (claim(study, spec, space) for _ in range(3))
    assert [t.number for t in (a, b, c)] == [0, 1, 2]
    study.tell(a, 0.1)
    study.tell(b, 0.2)
    assert claim(study, spec, space) == WAIT  # c is running (and beating at claim time)
    time.sleep(2.2)  # c's worker "died": no heartbeat for longer than grace_period
    retry = claim(study, spec, space)
    assert retry.number == 3 and retry.params == c.params
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
    assert study.trials[3].system_attrs["failed_trial"] == 2
    time.sleep(2.2)  # the retry dies too: max_retry=1 allows no second retry
    assert claim(study, spec, space) == DONE
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert summary(study, spec)["retried"] == [2]


def test_resume_extends_and_pareto_front_equals_brute_force(tmp_path):
    """Optuna's front (study.best_trials, in the summary) equals the brute-force front over the
    trials, ties included. Bug guarded: a front computed over some objectives only, or one that
    drops equal points."""
    spec = _spec(tmp_path, directions=["maximize"] * 3, n_trials=30)
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study = open_study(spec, space)
    rng = random.Random(0)
    for _ in range(30):
        t = claim(study, spec, space)
        study.tell(t, [rng.randrange(4) / 4 for _ in range(3)])  # coarse values: many ties
    assert claim(study, spec, space) == DONE
    values = [tuple(t.values) for t in study.trials]
    expected = pareto_front(values)
    got = [t["number"] for t in summary(study, spec)["pareto_front"]]
    assert got == expected and len(expected) < 30
    assert any(values[i] == values[j] for i, j in itertools.combinations(expected, 2))
    more = _spec(tmp_path, directions=["maximize"] * 3, n_trials=31)  # the same study, extended
    assert claim(open_study(more, space), more, space).number == 30
    with pytest.raises(ValueError, match="created with directions"):
        open_study(_spec(tmp_path, directions=["minimize"]), space)


def test_dependencies_have_no_old_pins():
    """Issue 17: optuna >= 4 and no SQLAlchemy < 2 / alembic < 1.14 / hydra-optuna-sweeper, in
    pyproject and in the environment."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower(): d for d in deps}
    assert "hydra-optuna-sweeper" not in names and "optuna>=4" in deps
    for name in ("sqlalchemy", "alembic"):
        assert name not in names or "<" not in names[name], names[name]
    assert int(version("optuna").split(".")[0]) >= 4
    assert int(version("sqlalchemy").split(".")[0]) >= 2
    assert tuple(int(x) for x in version("alembic").split(".")[:2]) >= (1, 14)
