"""Build the toy world from a distill config (`python distill.py +experiment=toy_data`), and build it on
demand when a toy experiment finds it missing.

    build_toy(cfg)                  # cfg.toy -> <toy dir>/{data,tokenizer,manifest.json}, logs a summary
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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
    splits = [SplitSpec("test", toy["splits"]["test"])] + [
        SplitSpec(name, size) for name, size in toy["splits"].items() if name != "test"
    ]
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
