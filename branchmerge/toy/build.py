"""Build the toy world from a distill config (`python distill.py +experiment=toy_data`), and build it on
demand when a toy experiment finds it missing.

    build_toy(cfg)                  # cfg.toy -> <toy dir>/{data,tokenizer,manifest.json}, logs a summary
    ensure_world(cfg)               # a train/eval/distill config that reads the toy world: build it if missing
"""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from branchmerge.errors import ConfigError
from branchmerge.toy.world import SplitSpec, build_world, check_knobs_all
from branchmerge.verify import sandbox

log = logging.getLogger(__name__)


def build_toy(cfg: DictConfig) -> dict:
    if cfg.teacher.name != "toy":
        raise ConfigError(
            f"the toy world is written by the toy teacher, not '{cfg.teacher.name}'; use teacher=toy"
        )
    toy = OmegaConf.to_container(cfg.toy, resolve=True)
    check_knobs_all(toy["domains"])
    if "test" not in toy["splits"]:
        raise ConfigError("toy.splits must include a 'test' split (the held-out evaluation set)")
    order = sorted(toy["splits"], key=lambda name: (name != "test", name == "val"))  # test first, val last
    splits = [SplitSpec(name, toy["splits"][name]) for name in order]
    manifest = build_world(
        cfg.paths.toy_dir if cfg.domains else cfg.output_dir,
        seed=toy["seed"],
        domains=toy["domains"],
        splits=splits,
        vocab_size=toy["vocab_size"],
        verify_sample=toy["verify_sample"],
        overwrite=toy["overwrite"],
    )
    manifest["sandbox"] = sandbox.provenance()
    summary = summarize(manifest, Path(cfg.output_dir))
    log.info("\n%s", summary)
    Path(cfg.paths.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.run_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def summarize(manifest: dict, out: Path) -> str:
    lines = [
        f"toy world at {out}",
        f"{'domain':<9}"
        + "".join(f"{s:>8}" for s in next(iter(manifest["sizes"].values())))
        + "   teacher traces the verifier accepts",
    ]
    for domain, sizes in manifest["sizes"].items():
        agree = [manifest["teacher_verifier_agreement"][f"{domain}/{s}"] for s in sizes]
        acc = sum(a["accepted"] for a in agree), sum(a["checked"] for a in agree)
        lines.append(f"{domain:<9}" + "".join(f"{n:>8}" for n in sizes.values()) + f"   {acc[0]}/{acc[1]}")
    overlap = sum(manifest["split_overlap"].values())
    lines.append(
        f"prompt overlap between splits: {overlap}; tokenizer: {manifest['tokenizer']['n_tokens']} tokens"
    )
    return "\n".join(lines)


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(nearest dict key, value) for every string value in a nested dict/list."""
    if isinstance(node, str):
        yield key, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)


def wants_toy_world(cfg: DictConfig) -> bool:
    """True when `cfg` reads the toy world (a path under paths.toy_dir, or a toy_* evaluation task) and
    does not build it itself (`toy:` set)."""
    if cfg.get("toy") is not None or "paths" not in cfg:
        return False
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # left to the stage's own validation, which names the key
        return False
    root = str(data["paths"]["toy_dir"]).rstrip("/") + "/"
    return any(v.startswith(root) or (k == "name" and v.startswith("toy_")) for k, v in _strings(data))


def ensure_world(cfg: DictConfig) -> None:
    """Build the toy world (`python distill.py +experiment=<paths.toy_world>`, default toy_data;
    deterministic, about a minute) at paths.toy_dir when `cfg` needs it and it has not been built, so
    toy stages run in any order."""
    if not wants_toy_world(cfg):
        return
    toy_dir = Path(cfg.paths.toy_dir)
    if (toy_dir / "manifest.json").exists():
        return
    # Stages started side by side (the demo's branches) find the world missing together: one builds it
    # while the others wait on the lock, then find its manifest.
    toy_dir.parent.mkdir(parents=True, exist_ok=True)
    with (toy_dir.parent / f".{toy_dir.name}.build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (toy_dir / "manifest.json").exists():
            return
        world = cfg.paths.get("toy_world") or "toy_data"
        log.info("no toy world at %s: building it first (python distill.py +experiment=%s)", toy_dir, world)
        cmd = [
            sys.executable,
            str(Path(cfg.paths.root_dir) / "distill.py"),
            f"+experiment={world}",
            f"paths.toy_dir={toy_dir}",
            f"paths.output_dir={cfg.paths.output_dir}",
        ]
        subprocess.run(cmd, check=True, cwd=cfg.paths.root_dir)
