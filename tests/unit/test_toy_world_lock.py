"""The toy world is built once when stages that need it start side by side."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from branchmerge.toy import build


def test_stages_started_together_build_the_missing_world_once(tmp_path, monkeypatch):
    """Bug planted: `ensure_world` without its lock — both stages see no manifest and both run the
    build (two `distill.py` writing one folder at once), so the call count is 2."""
    toy_dir = tmp_path / "toy_world_hard"
    calls: list[list[str]] = []

    def fake_build(cmd, check, cwd):  # the distill.py subprocess: slow, then the manifest
        calls.append(cmd)
        time.sleep(0.5)
        toy_dir.mkdir(parents=True, exist_ok=True)
        (toy_dir / "manifest.json").write_text("{}")

    monkeypatch.setattr(build.subprocess, "run", fake_build)
    cfg = OmegaConf.create(
        {
            "paths": {
                "toy_dir": str(toy_dir),
                "toy_world": "toy_data_hard",
                "root_dir": str(Path.cwd()),
                "output_dir": str(tmp_path),
            },
            "data": {"train_files": [f"{toy_dir}/data/math/train.jsonl"]},
        }
    )
    stages = [threading.Thread(target=build.ensure_world, args=(cfg,)) for _ in range(3)]
    for t in stages:
        t.start()
    for t in stages:
        t.join()
    assert len(calls) == 1
    assert "+experiment=toy_data_hard" in calls[0]
    build.ensure_world(cfg)  # built: nothing more to do
    assert len(calls) == 1
