"""One sweep worker: claim a trial from the shared Optuna study, run it, tell the result; repeat.

Every worker runs the same command (`python merge.py +hparams_search=...`), on one machine or many;
they meet only in the study's storage (storage.py). A claim happens under the study's claim lock:

    1. fail the RUNNING trials whose worker stopped beating; their retries are enqueued (WAITING)
    2. a WAITING trial (a retry, or one enqueued by hand) is claimed first
    3. else a new trial is asked for while the study holds fewer than `n_trials` first attempts
    4. else, if trials still run elsewhere, wait `poll_interval` (one may die and need a retry);
       if none runs, the study is finished and the worker leaves

so `n_trials` is the study's total: no trial runs twice (a retry replaces a dead attempt) and none
is lost; running the same command again resumes an interrupted study, and a larger `n_trials`
extends it. Afterwards <sweep dir>/optuna_summary.json holds the study's best trial, or for a
multi-objective study its Pareto front (`study.best_trials`), which `report sweep` plots.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchmerge.sweep.storage import beat, claim_lock, fail_stale, heartbeats, open_storage

log = logging.getLogger(__name__)
RETRY_OF = "failed_trial"  # system attribute Optuna's retry callback puts on a retry
WAIT, DONE = "wait", "done"


@dataclass
class StudySpec:
    """What a worker needs to find and feed the study (the sweeper config, resolved)."""

    study_name: str
    storage: str
    directions: list[str]
    n_trials: int
    sampler: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 2
    poll_interval: float = 10.0


def open_study(spec: StudySpec, space: dict[str, Any]) -> Any:
    """Create the study or load it (same name and storage); directions must match the stored ones."""
    import optuna

    from branchmerge.sweep.search_space import make_sampler

    storage = open_storage(spec.storage, spec.heartbeat_interval, spec.grace_period, spec.max_retry)
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=storage,
        sampler=make_sampler(spec.sampler, space, len(spec.directions)),
        directions=spec.directions,
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != [d.lower() for d in spec.directions]:
        raise ValueError(
            f"study {spec.study_name!r} in {redact(spec.storage)} was created with directions {stored}, "
            f"the config asks for {spec.directions}: use another hydra.sweeper.study_name"
        )
    return study


def claim(study: Any, spec: StudySpec, space: dict[str, Any]) -> Any:
    """A claimed trial (RUNNING, parameters drawn), or WAIT / DONE (see the module docstring)."""
    from optuna.trial import TrialState

    with claim_lock(spec.storage, spec.study_name):
        fail_stale(study, spec.grace_period, spec.max_retry)
        trials = study.get_trials(deepcopy=False)
        reseed(study, spec, space, len(trials))
        waiting = any(t.state == TrialState.WAITING for t in trials)
        first_attempts = sum(RETRY_OF not in t.system_attrs for t in trials)
        if waiting or first_attempts < spec.n_trials:
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize"
                warnings.simplefilter("ignore")
                trial = study.ask(fixed_distributions=space)
            beat(study._storage, trial._trial_id)  # stale-detectable from its first second
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            return trial
    running = any(t.state == TrialState.RUNNING for t in trials)
    return WAIT if running else DONE


def reseed(study: Any, spec: StudySpec, space: dict[str, Any], n_existing: int) -> None:
    """A seeded sampler draws with seed + (trials in the study so far): reproducible, and two
    workers with the same config never draw the same parameters (one shared seed would)."""
    from branchmerge.sweep.search_space import make_sampler

    seed = spec.sampler.get("seed")
    if seed is not None:
        cfg = {**spec.sampler, "seed": int(seed) + n_existing}
        study.sampler = make_sampler(cfg, space, len(spec.directions), quiet=True)


def as_values(value: Any, n_objectives: int) -> list[float]:
    """A trial's return value as one float per objective; a clear error if the count is wrong."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != n_objectives:
        raise ValueError(
            f"the trial returned {len(values)} value(s) but hydra.sweeper.direction has {n_objectives}: "
            "for a multi-objective sweep set score.objectives to one task per direction"
        )
    return [float(v) for v in values]


def override(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar (strings quoted when they need it)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={value}"


def work(
    study: Any,
    spec: StudySpec,
    space: dict[str, Any],
    fixed: list[str],
    launch: Callable[[list[list[str]], list[int]], list[Any]],
    batch_size: int = 1,
) -> int:
    """Claim, run (`launch(overrides, trial numbers) -> Hydra JobReturns`) and tell until the study
    is finished; returns how many trials this worker ran."""
    ran = 0
    while True:
        claimed, state = [], WAIT
        while len(claimed) < batch_size:
            state = claim(study, spec, space)
            if isinstance(state, str):
                break
            claimed.append(state)
        if not claimed:
            if state == DONE:
                return ran
            time.sleep(spec.poll_interval)
            continue
        overrides = [fixed + [override(k, v) for k, v in t.params.items()] for t in claimed]
        ids = [t._trial_id for t in claimed]
        log.info("running trial(s) %s: %s", [t.number for t in claimed], overrides)
        with heartbeats(study._storage, ids, spec.heartbeat_interval):
            returns = launch(overrides, [t.number for t in claimed])
        for trial, ret in zip(claimed, returns):
            tell(study, trial, ret, len(spec.directions))
        ran += len(claimed)


def tell(study: Any, trial: Any, ret: Any, n_objectives: int) -> None:
    """Record a job's result on its trial: its values, or FAIL (and the error raised) if it raised."""
    from optuna.trial import TrialState

    hydra_cfg = getattr(ret, "hydra_cfg", None)
    if hydra_cfg is not None:
        trial.set_user_attr("run_dir", str(hydra_cfg.hydra.runtime.output_dir))
    try:
        values = as_values(ret.return_value, n_objectives)
    except Exception:
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, values)
    log.info("trial %d: %s", trial.number, values)


def redact(url: str) -> str:
    """The storage URL without its password."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def summary(study: Any, spec: StudySpec) -> dict[str, Any]:
    """Counts per state, and the best trial (one objective) or the Pareto front (several)."""
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1

    def row(t: Any) -> dict[str, Any]:
        return {"number": t.number, "values": t.values, "params": t.params, **t.user_attrs}

    out = {
        "study_name": spec.study_name,
        "storage": redact(spec.storage),
        "directions": spec.directions,
        "n_trials": spec.n_trials,
        "states": states,
        "retried": sorted(
            {t.system_attrs[RETRY_OF] for t in study.get_trials(deepcopy=False) if RETRY_OF in t.system_attrs}
        ),
    }
    if not states.get("COMPLETE"):
        return out
    if len(spec.directions) == 1:
        out["best"] = row(study.best_trial)
    else:
        out["pareto_front"] = [row(t) for t in sorted(study.best_trials, key=lambda t: t.number)]
    return out


def write_summary(study: Any, spec: StudySpec, sweep_dir: Path) -> Path:
    """<sweep dir>/optuna_summary.json, written atomically (every worker writes it on leaving)."""
    path = Path(sweep_dir) / "optuna_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary(study, spec), indent=1) + "\n")
    os.replace(tmp, path)
    return path
