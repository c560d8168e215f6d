"""`python distill.py ...`: validate the config, build the datasets, print what was written.

Two kinds of job, chosen by the config:
- `toy:` set: build the toy world (datasets + tokenizer) with the toy oracle (+experiment=toy_data).
- `domains:` set: one branch dataset per domain (branchmerge/distill/domain.py) under output_dir,
  plus <output_dir>/manifest.json: inputs with sha256, the resolved config, the git revision, the
  decontamination sets and every domain's stats.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import DistillConfig
from branchmerge.distill.dedup import NgramIndex
from branchmerge.distill.domain import Context, _write_json, plain, run_domain
from branchmerge.distill.sources import expand
from branchmerge.eval import sandbox
from branchmerge.toy.world import SplitSpec, build_world, check_knobs_all, sha256_file
from branchmerge.utils.git import git_revision

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    cfg = validate(cfg, DistillConfig)
    if cfg.toy is None and not cfg.domains:
        raise ValueError(
            "nothing to do: set `toy:` (python distill.py +experiment=toy_data) or `domains:` "
            "(e.g. +experiment=math_data, +experiment=toy_distill)"
        )
    sandbox.configure(cfg.sandbox.isolation, cfg.sandbox.workers)  # code verification, toy code
    manifest = build_toy(cfg) if cfg.toy is not None else {}
    if cfg.domains:
        manifest = distill(cfg)
    return manifest


def build_toy(cfg: DictConfig) -> dict:
    if cfg.teacher.name != "toy":
        raise ValueError(
            f"the toy world is written by the toy teacher, not '{cfg.teacher.name}'; use teacher=toy"
        )
    toy = OmegaConf.to_container(cfg.toy, resolve=True)
    check_knobs_all(toy["domains"])
    if "test" not in toy["splits"]:
        raise ValueError("toy.splits must include a 'test' split (the held-out evaluation set)")
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


def _context(cfg: DictConfig) -> tuple[Context, dict[str, int]]:
    sel = cfg.selection
    d = sel.decontam
    from branchmerge.distill.evalsets import eval_texts

    texts = eval_texts(list(d.sets), d.eval_data_dir, d.toy_dir, d.missing) if d.sets else {}
    index = NgramIndex(texts, d.ngram, d.threshold, d.max_df) if texts else None
    count = None
    if sel.max_tokens is not None:
        if not cfg.student_tokenizer:
            raise ValueError(
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
                raise FileNotFoundError(f"domains.{name}: {e}") from e
            out += [
                {
                    "domain": name,
                    "format": src.format,
                    "path": str(p),
                    "bytes": p.stat().st_size,
                    "sha256": sha256_file(p),
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
        _write_json(out / "manifest.json", manifest)  # after each domain: finished ones are recorded
    manifest["seconds"] = round(time.time() - t0, 1)
    _write_json(out / "manifest.json", manifest)
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
