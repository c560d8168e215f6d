"""The `bm_optuna` Hydra sweeper: turns hydra.sweeper.* into a StudySpec and runs one worker (or,
with n_jobs > 1 under the basic launcher, n_jobs pinned worker processes of the same command).
Another launcher (submitit, joblib) gets batches of n_jobs trials per launch instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class BranchmergeOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        from branchmerge.sweep import local_workers
        from branchmerge.sweep.optuna_sweep import open_study, work, write_summary
        from branchmerge.sweep.search_space import parse_space

        s = self.settings
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / f"multirun.yaml.{os.getpid()}.tmp"
        OmegaConf.save(self.config, tmp)
        os.replace(tmp, sweep_dir / "multirun.yaml")
        space, fixed = parse_space(s.get("params") or {}, arguments)
        spec = study_spec(s, space, sweep_dir)
        basic = isinstance(self.launcher, BasicLauncher)
        if basic and s.get("n_jobs", 1) > 1:
            codes = local_workers.spawn(int(s["n_jobs"]))
            study = open_study(spec, space)
            write_summary(study, spec, sweep_dir)
            if any(c != 0 for c in codes):
                raise RuntimeError(f"sweep workers exited with {codes}; rerun the command to resume")
            return None
        study = open_study(spec, space)

        def launch(overrides: list[list[str]], numbers: list[int]) -> list[Any]:
            if basic:  # one at a time; the job number is the Optuna trial number
                return [self.launcher.launch([o], initial_job_idx=n)[0] for o, n in zip(overrides, numbers)]
            return list(self.launcher.launch(overrides, initial_job_idx=numbers[0]))

        try:
            ran = work(study, spec, space, fixed, launch, batch_size=1 if basic else int(s.get("n_jobs", 1)))
        finally:
            path = write_summary(study, spec, sweep_dir)
        log.info("this worker ran %d trial(s); study summary: %s", ran, path)
        return None


def study_spec(s: dict[str, Any], space: dict[str, Any], sweep_dir: Path) -> Any:
    """hydra.sweeper.* -> StudySpec; every problem reported at once."""
    from branchmerge.sweep.optuna_sweep import StudySpec
    from branchmerge.sweep.search_space import grid_of

    directions = s.get("direction") or "maximize"
    directions = [directions] if isinstance(directions, str) else list(directions)
    sampler = dict(s.get("sampler") or {"type": "tpe"})
    n_trials = s.get("n_trials")
    problems = [
        f"hydra.sweeper.direction: {d!r} is not maximize or minimize"
        for d in directions
        if d not in ("maximize", "minimize")
    ]
    if not space:
        problems.append("hydra.sweeper.params: nothing to search (give interval(), range() or choice())")
    if n_trials is None and sampler.get("type") == "grid" and space:
        n_trials = 1
        for values in grid_of(space).values():
            n_trials *= len(values)
    if n_trials is None or int(n_trials) < 1:
        problems.append("hydra.sweeper.n_trials: set the study's total number of trials (>= 1)")
    for key in ("heartbeat_interval", "grace_period"):
        if int(s.get(key, 1)) < 1:
            problems.append(f"hydra.sweeper.{key}: a whole number of seconds >= 1")
    if problems:
        raise ValueError("bad sweeper config:\n  " + "\n  ".join(problems))
    return StudySpec(
        study_name=s.get("study_name") or sweep_dir.name,
        storage=s.get("storage") or f"sqlite:///{sweep_dir.absolute() / 'optuna.db'}",
        directions=directions,
        n_trials=int(n_trials),
        sampler=sampler,
        heartbeat_interval=int(s.get("heartbeat_interval", 60)),
        grace_period=int(s.get("grace_period", 180)),
        max_retry=int(s.get("max_retry", 2)),
        poll_interval=float(s.get("poll_interval", 10.0)),
    )
