"""`python merge.py ...`: a config (recipe, single-step overrides, or a mergekit YAML) -> a merge."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import MergeConfig
from branchmerge.errors import MergeRecipeError
from branchmerge.merge.engine import MergeOptions, merge
from branchmerge.merge.mergekit import from_mergekit
from branchmerge.merge.recipe import model_paths, parse_steps

log = logging.getLogger(__name__)


def recipe_from_config(cfg: DictConfig) -> tuple[dict[str, Path], list, MergeOptions, dict]:
    c = OmegaConf.to_container(cfg, resolve=True)
    opts = dict(c["options"])
    if c.get("from_mergekit"):
        mk = from_mergekit(c["from_mergekit"])
        models = {k: Path(v) for k, v in mk["models"].items()}
        raw_steps = mk["steps"]
        opts["out_dtype"] = opts["out_dtype"] or mk["out_dtype"]
        opts["copy_files_from"] = opts["copy_files_from"] or mk["copy_files_from"]
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
            }
        ]
    steps = parse_steps(raw_steps, set(models))
    recipe = {"models": {k: str(v) for k, v in models.items()}, "steps": raw_steps, "options": opts}
    return models, steps, MergeOptions(**opts), recipe


def _same_inputs(old: dict, models: dict[str, Path], recipe: dict) -> bool:
    """The existing output was made by this recipe, by an engine that computes the same values, from
    byte-identical inputs (content hashes)."""
    from branchmerge.merge.provenance import ENGINE_VERSION, file_hash

    if old.get("recipe") != json.loads(json.dumps(recipe)) or old.get("engine_version") != ENGINE_VERSION:
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
    if (out / "merge_provenance.json").exists() and not cfg.overwrite:
        old = json.loads((out / "merge_provenance.json").read_text())
        if _same_inputs(old, models, recipe):
            log.info("%s already holds this merge of these inputs (overwrite=true merges again)", out)
            return old
        log.info("%s is from another recipe or other inputs; merging again", out)
    record = merge(models, steps, out, options, recipe)
    log.info("merged model: %s (%.1fs)", out, record["seconds"])
    return record
