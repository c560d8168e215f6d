"""Periodic checkpoints written atomically, and automatic resume from the newest complete one.

    <run dir>/checkpoints/step-00000040.ckpt   (a file, or a folder of shards under FSDP2)

A checkpoint is saved to `<name>.tmp` and renamed once every rank has finished writing, so a run
killed mid-save leaves no checkpoint that looks complete; stale `.tmp` entries are removed on resume
by global rank 0 alone (the folder may be on storage every node shares). Checkpoints fall every
`every_n_steps` optimizer steps *of the whole run* and at its final step, so a crash during the export
resumes with nothing left to train.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})\.ckpt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}.ckpt"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def remove_partial(ckpt_dir: Path) -> None:
    for p in ckpt_dir.glob("*.tmp"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


class AtomicCheckpoint(L.Callback):
    def __init__(self, ckpt_dir: str | Path, every_n_steps: int, keep_last: int) -> None:
        self.dir, self.every, self.keep = Path(ckpt_dir), every_n_steps, keep_last

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.dir.exists():
            remove_partial(self.dir)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step, total = trainer.global_step, pl_module.total_steps
        if step == total or (self.every > 0 and step % self.every == 0 and step < total):
            self.save(trainer, step)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        final = checkpoint_path(self.dir, step)
        tmp = final.with_name(final.name + ".tmp")
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                _remove(tmp)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            tmp.replace(final)
            for old in complete_checkpoints(self.dir)[: -self.keep] if self.keep > 0 else []:
                _remove(old)
            log.info("checkpoint: %s", final)
        trainer.strategy.barrier()
        return final
