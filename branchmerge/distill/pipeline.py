"""`python distill.py ...`: validate the config, build the datasets, print what was written.

Two kinds of job, chosen by the config:
- `toy:` set: build the toy world (datasets + tokenizer) with the toy oracle (+experiment=toy_data),
  through `branchmerge.toy.build`, which distill.py passes in.
- `domains:` set: one branch dataset per domain (branchmerge/distill/domain.py) under output_dir,
  plus <output_dir>/manifest.json: inputs with sha256, the resolved config, the git revision, the
  decontamination sets and every domain's stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from branchmerge.config import validate
from branchmerge.config.schema import DistillConfig
from branchmerge.distill.dedup import NgramIndex
from branchmerge.distill.domain import Context, plain, run_domain
from branchmerge.distill.sources import expand
from branchmerge.errors import ConfigError, MissingFileError
from branchmerge.foundation import file_hash, write_json
from branchmerge.utils.git import git_revision
from branchmerge.verify import sandbox

log = logging.getLogger(__name__)


def run(cfg: DictConfig, build_toy: Callable[[DictConfig], dict] | None = None) -> dict:
    """Validate `cfg`, then build the toy world (`toy:`, with `build_toy`, which the entry point passes
    in: the toy world uses this stage, never the other way round) and the branch datasets (`domains:`)."""
    cfg = validate(cfg, DistillConfig)
    if cfg.toy is None and not cfg.domains:
        raise ConfigError(
            "nothing to do: set `toy:` (python distill.py +experiment=toy_data) or `domains:` "
            "(e.g. +experiment=math_data, +experiment=toy_distill)"
        )
    sandbox.configure(cfg.sandbox.isolation, cfg.sandbox.workers)  # code verification, toy code
    if cfg.toy is not None and build_toy is None:
        raise ConfigError("`toy:` is set but no toy-world builder was given: run `python distill.py`")
    manifest = build_toy(cfg) if cfg.toy is not None else {}
    if cfg.domains:
        manifest = distill(cfg)
    return manifest


def _context(cfg: DictConfig) -> tuple[Context, dict[str, int]]:
    sel = cfg.selection
    d = sel.decontam
    from branchmerge.distill.evalsets import eval_texts

    texts = eval_texts(list(d.sets), d.eval_data_dir, d.toy_dir, d.missing) if d.sets else {}
    index = NgramIndex(texts, d.ngram, d.threshold, d.max_df) if texts else None
    count = None
    if sel.max_tokens is not None:
        if not cfg.student_tokenizer:
            raise ConfigError(
                "selection.max_tokens needs student_tokenizer (or set selection.max_tokens=null)"
            )
        from transformers import AutoTokenizer

        from branchmerge.distill.filters import TokenCounter

        count = TokenCounter(AutoTokenizer.from_pretrained(cfg.student_tokenizer), sel.template)
    ctx = Context(sel, cfg.teacher, cfg.on_bad_row, index, count)
    return ctx, {k: len(v) for k, v in texts.items()}


def _inputs(cfg: DictConfig) -> list[dict]:
    out = []
    for name, dcfg in cfg.domains.items():
        for src in dcfg.sources:
            try:
                files = expand(src.path)
            except FileNotFoundError as e:
                raise MissingFileError(f"domains.{name}: {e}") from e
            out += [
                {
                    "domain": name,
                    "format": src.format,
                    "path": str(p),
                    "bytes": p.stat().st_size,
                    "sha256": file_hash(p, "sha256"),
                }
                for p in files
            ]
    return out


def distill(cfg: DictConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.output_dir)
    inputs = _inputs(cfg)  # every input exists before any work (or money) is spent
    ctx, decontam_sizes = _context(cfg)
    if any(d.generate for d in cfg.domains.values()):
        from branchmerge.distill.teachers import build_teacher

        ctx.make_teacher = partial(
            build_teacher,
            cfg.teacher,
            **({"toy_dir": cfg.paths.toy_dir} if cfg.teacher.name == "toy" else {}),
        )
    manifest = {
        "config": plain(cfg),
        "git_revision": git_revision(),
        "inputs": inputs,
        "decontam_sets": decontam_sizes,
        "sandbox": sandbox.provenance(),  # how code verification ran programs
        "stats": {},
    }
    for name, dcfg in cfg.domains.items():
        td = time.time()
        manifest["stats"][name] = run_domain(name, dcfg, out, ctx)
        log.info("%s: %s (%.1fs)", name, manifest["stats"][name]["traces"], time.time() - td)
        manifest["outputs"] = {n: str(out / n / "train.jsonl") for n in manifest["stats"]}
        write_json(out / "manifest.json", manifest)  # after each domain: finished ones are recorded
    manifest["seconds"] = round(time.time() - t0, 1)
    write_json(out / "manifest.json", manifest)
    log.info("\n%s", summarize_stats(manifest["stats"], out))
    return manifest


def summarize_stats(stats: dict, out: Path) -> str:
    """One row per domain and stage: input, removed per reason (blank: not a filter of that stage), kept."""
    reasons = sorted(
        {r for s in stats.values() for r in s["traces"]["removed"]}
        | {r for s in stats.values() for r in s.get("seeds", {}).get("removed", {})}
    )
    w = {r: len(r) + 2 for r in reasons}
    head = (
        f"{'domain':<10}{'stage':<8}{'input':>7}" + "".join(f"{r:>{w[r]}}" for r in reasons) + f"{'kept':>7}"
    )
    lines = [f"branch datasets at {out}", head]
    for name, s in stats.items():
        for stage in ("seeds", "traces"):
            if stage in s:
                st = s[stage]
                cells = "".join(f"{st['removed'].get(r, ''):>{w[r]}}" for r in reasons)
                lines.append(f"{name:<10}{stage:<8}{st['input']:>7}{cells}{st['kept']:>7}")
    return "\n".join(lines)
