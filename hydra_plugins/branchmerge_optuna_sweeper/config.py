# ruff: noqa: UP006, UP035, UP045
"""The `bm_optuna` sweeper's config (hydra/sweeper group), registered when Hydra scans its plugins.

hydra.sweeper:
  direction: maximize          # or a list, one per objective: [maximize, maximize, maximize]
  study_name: my_sweep         # default: the sweep folder's name
  storage: sqlite:///x.db      # or journal:///shared/x.journal, postgresql://u:p@host/db
  n_trials: 20                 # the study's total (a rerun resumes; a larger value extends)
  n_jobs: 1                    # local workers, each pinned to its share of cores / GPUs
  sampler: {type: tpe, seed: 0, n_startup_trials: 5}   # tpe | gp | cmaes | grid | random | nsgaii
  params: {steps.0.params.k: interval(0.0, 4.0)}       # Hydra's interval/range/choice syntax
  heartbeat_interval: 60       # seconds between a running trial's heartbeats
  grace_period: 180            # no heartbeat for this long: the trial's worker is dead
  max_retry: 2                 # a dead worker's trial is rerun at most this many times
  poll_interval: 10            # an idle worker's wait while other workers' trials finish
"""

# no `from __future__ import annotations`: Hydra loads this module outside sys.modules, and OmegaConf
# reads the real types (hence Optional/Dict, not PEP 604)
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BranchmergeOptunaSweeperConf:
    _target_: str = "hydra_plugins.branchmerge_optuna_sweeper.sweeper.BranchmergeOptunaSweeper"
    direction: Any = "maximize"
    study_name: Optional[str] = None
    storage: Optional[str] = None
    n_trials: Optional[int] = None
    n_jobs: int = 1
    sampler: Dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    params: Optional[Dict[str, Any]] = None
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 2
    poll_interval: float = 10.0


ConfigStore.instance().store(
    group="hydra/sweeper", name="bm_optuna", node=BranchmergeOptunaSweeperConf, provider="branchmerge"
)
