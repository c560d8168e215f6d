"""`make demo`: the toy Branch-Merge pipeline end to end on CPU, through the real entry points.

Each stage runs as its own process with the same command a user would type, and a finished stage is
reused when the demo runs again (every stage skips work whose outputs are complete).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(title: str, *args: str) -> float:
    print(f"\n=== {title}: python {' '.join(args)}", flush=True)
    t0 = time.time()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)
    return time.time() - t0


def main() -> None:
    t0 = time.time()
    took = stage("1/1 toy world (data + tokenizer)", "distill.py", "+experiment=toy_data")
    print(f"\ntoy world ready in {took:.0f}s (total {time.time() - t0:.0f}s).")
    print("The demo stops here: branch training, merging and evaluation are not in this version yet.")


if __name__ == "__main__":
    main()
