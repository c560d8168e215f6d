"""One W&B run per scored merge: the trial's parameters as config, its scores and objective as summary.

Offline by default (WANDB_MODE=offline): the run lands in <trial dir>/wandb/offline-run-*/ and
`wandb sync <that folder>` uploads it later. Under a W&B sweep agent, `wandb.init` joins the agent's
run, so the sweep sees `objective`.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def log_trial(
    *, project: str, group: str, mode: str, name: str, config: dict, row: dict, run_dir: Path
) -> Path | None:
    """Write the run; returns its folder. A W&B failure is logged, never fails the trial."""
    import wandb

    metrics = {"objective": row["objective"], "trial_seconds": row["trial_seconds"]}
    if row.get("merge_seconds") is not None:
        metrics["merge_seconds"] = row["merge_seconds"]
    for task, s in row["scores"].items():
        metrics[f"{task}/pass@1"] = s["pass@1"]
        metrics[f"{task}/stderr"] = s["stderr"]
    run_dir.mkdir(parents=True, exist_ok=True)
    run = None
    try:
        run = wandb.init(
            project=project,
            group=group,
            name=name,
            mode=mode,
            dir=str(run_dir),
            config=config,
            job_type="merge-trial",
            settings=wandb.Settings(silent=True, console="off"),
        )
        run.log(metrics)
        run.summary.update({**metrics, "status": row["status"]})
        return Path(run.dir).parent
    except Exception as e:  # W&B is a record of the trial, not part of its result
        log.warning("could not write the W&B run for %s: %s", name, e)
        return None
    finally:
        if run is not None:
            run.finish()
