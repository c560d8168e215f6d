"""`python merge.py ...`: a config (recipe, single-step overrides, or a mergekit YAML) -> a merge.

Dtypes: a recipe computes in `options.compute_dtype` (conf/merge.yaml: float32) and writes
`options.out_dtype` (null: each tensor's stored dtype). A mergekit YAML sets both with mergekit's
meaning (`branchmerge.merge.mergekit`): its `dtype` replaces `options.compute_dtype` (no `dtype`:
the inputs' stored dtype), its `out_dtype` (default `dtype`) fills an unset `options.out_dtype`.
Its `slices` become a sliced step; its `tokenizer_source` / `tokenizer:` the recipe's `tokenizer`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import CalibrationConfig, MergeConfig
from branchmerge.errors import MergeRecipeError
from branchmerge.merge import activations
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.io import BY_NAME, Checkpoint
from branchmerge.merge.mergekit import from_mergekit, pick_chat_template
from branchmerge.merge.recipe import model_paths, parse_steps

log = logging.getLogger(__name__)


def _stored_dtype(models: dict[str, Path], step: dict) -> str:
    """The dtype name of the first tensor of the step's base (else first input): what mergekit
    computes in when its YAML gives no `dtype`."""
    inputs = step["slices"][0]["inputs"] if step.get("slices") else step["inputs"]
    first = step.get("base") or next(i if isinstance(i, str) else i["model"] for i in inputs)
    ck = Checkpoint(models[first])
    stored = ck.info[ck.names[0]].dtype
    return next(k for k, v in BY_NAME.items() if v == stored)


def recipe_from_config(cfg: DictConfig) -> tuple[dict[str, Path], list, MergeOptions, dict]:
    c = OmegaConf.to_container(cfg, resolve=True)
    opts = dict(c["options"])
    template = tokenizer = None
    if c.get("from_mergekit"):
        mk = from_mergekit(c["from_mergekit"])
        models = {k: Path(v) for k, v in mk["models"].items()}
        raw_steps = mk["steps"]
        opts["compute_dtype"] = mk["compute_dtype"] or _stored_dtype(models, raw_steps[0])
        opts["out_dtype"] = opts["out_dtype"] or mk["out_dtype"]
        opts["copy_files_from"] = opts["copy_files_from"] or mk["copy_files_from"]
        log.info(
            "mergekit YAML: computing in %s, writing %s",
            opts["compute_dtype"],
            opts["out_dtype"] or "as stored",
        )
        template = pick_chat_template(str(mk["chat_template"]), models) if mk["chat_template"] else None
        tokenizer = mk["tokenizer"]
    elif c["steps"]:
        models, raw_steps = model_paths(c["models"], []), c["steps"]
    else:
        if not c["method"]:
            raise MergeRecipeError(
                "nothing to merge: give `steps` (a recipe, e.g. +experiment=toy_merge_tinyr1), "
                "`method=... inputs=[...]` for one step, or `from_mergekit=config.yml`"
            )
        refs = [i if isinstance(i, str) else i["model"] for i in c["inputs"]] + (
            [c["base"]] if c["base"] else []
        )
        models = model_paths(c["models"], refs)
        raw_steps = [
            {
                "name": c["run_name"],
                "method": c["method"],
                "base": c["base"],
                "inputs": c["inputs"],
                "params": c["params"],
                **({"lines": c["lines"]} if c.get("lines") else {}),
            }
        ]
    steps = parse_steps(raw_steps, set(models))
    recipe = {"models": {k: str(v) for k, v in models.items()}, "steps": raw_steps, "options": opts}
    if activations.pending(steps):  # ACM: coefficients from a forward pass over calibration rows
        recipe["calibration"] = dict(c.get("calibration") or {})
        activations.check(steps, models, recipe["calibration"].get("files", []))
    if template:
        recipe["chat_template"] = template  # written into the output's tokenizer_config.json
    if tokenizer:
        recipe["tokenizer"] = tokenizer  # the output vocabulary (branchmerge.merge.vocab)
    return models, steps, MergeOptions(**opts), recipe


def _same_inputs(old: dict, models: dict[str, Path], recipe: dict) -> bool:
    """The existing output was made by this recipe, by an engine that computes the same values, from
    byte-identical inputs (content hashes)."""
    from branchmerge.merge.provenance import ENGINE_VERSION, file_hash

    if old.get("recipe") != json.loads(json.dumps(recipe)) or old.get("engine_version") != ENGINE_VERSION:
        return False
    if "calibration" in recipe:  # the calibration files' contents, too
        files = activations.calibration_hashes(recipe["calibration"]["files"])
        if old.get("acm", {}).get("calibration", {}).get("files") != files:
            return False
    for name, info in old.get("inputs", {}).items():
        path = models.get(name)
        if path is None or not info.get("hash"):
            return False
        for fname, h in info["files"].items():
            f = Path(path) / fname
            if not f.exists() or file_hash(f) != h:
                return False
    return True


def run(cfg: DictConfig, validated: bool = False) -> dict:
    """Merge as `cfg` says (a composed merge config; `validated`: already checked by `validate`)."""
    cfg = cfg if validated else validate(cfg, MergeConfig)
    out = Path(cfg.output_dir)
    models, steps, options, recipe = recipe_from_config(cfg)
    old = None
    if (out / "merge_provenance.json").exists():
        old = json.loads((out / "merge_provenance.json").read_text())
        if not cfg.overwrite:
            if _same_inputs(old, models, recipe):
                log.info("%s already holds this merge of these inputs (overwrite=true merges again)", out)
                return old
            log.info("%s is from another recipe or other inputs; merging again", out)
    extra = None
    if "calibration" in recipe:  # the activation pass, one model at a time, before the streaming merge
        cal = CalibrationConfig(**recipe["calibration"])
        cached = (old or {}).get("acm")
        extra = {
            "acm": activations.prepare(steps, models, cal, cached, options.hash_inputs, options.progress)
        }
    record = merge(
        models,
        steps,
        out,
        options,
        recipe,
        recipe.get("chat_template"),
        tokenizer=recipe.get("tokenizer"),
        provenance_extra=extra,
    )
    log.info("merged model: %s (%.1fs)", out, record["seconds"])
    return record
