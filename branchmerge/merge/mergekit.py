"""Run mergekit YAML configs: `python merge.py from_mergekit=config.yml output_dir=OUT`.

Converts mergekit's format (merge_method, base_model, models[].parameters, parameters, dtype,
tokenizer_source) into our recipe. Shared methods: linear, task_arithmetic, ties, dare_linear,
dare_ties, slerp, arcee_fusion, model_stock. Gradients (lists) and `filter` lists map to our depth lists and
module-name patterns. Anything else is a clear error rather than a silently different merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from branchmerge.errors import MissingFileError
from branchmerge.merge.recipe import RecipeError

SHARED = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "arcee_fusion",
    "model_stock",
}
RENAME = {"lambda": "lambda_"}
IGNORED = {"int8_mask"}  # a flag for mergekit's memory layout only


def _value(v: Any) -> Any:
    """mergekit value -> ours: scalar | gradient list | [{filter, value}, ..., {value}] -> pattern dict."""
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        out: dict[str, Any] = {}
        for item in v:
            if "filter" in item:
                out[str(item["filter"])] = _value(item["value"])
            else:
                out["default"] = _value(item["value"])
        return out
    return v


def _params(raw: dict | None, where: str) -> dict[str, Any]:
    out = {}
    for k, v in (raw or {}).items():
        if k in IGNORED:
            continue
        out[RENAME.get(k, k)] = _value(v)
    return out


def _name(path: str) -> str:
    return Path(str(path)).name or str(path)


def from_mergekit(path: str | Path) -> dict[str, Any]:
    """{'models': {name: path}, 'steps': [...], 'out_dtype': ..., 'copy_files_from': ...}."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"mergekit config {path} does not exist")
    cfg = yaml.safe_load(path.read_text())
    method = cfg.get("merge_method")
    if method not in SHARED:
        raise RecipeError(f"{path}: merge_method '{method}' is not one we run; supported: {sorted(SHARED)}")
    if "slices" in cfg:
        raise RecipeError(
            f"{path}: `slices` are not supported; use `models:` (with per-module patterns via "
            "`filter` in parameters)"
        )
    unknown = set(cfg) - {
        "merge_method",
        "base_model",
        "models",
        "parameters",
        "dtype",
        "tokenizer_source",
        "tokenizer",
        "out_dtype",
        "name",
    }
    if unknown:
        raise RecipeError(f"{path}: unsupported mergekit keys {sorted(unknown)}")
    base = cfg.get("base_model")
    models: dict[str, str] = {}
    inputs: list[Any] = []
    for entry in cfg.get("models") or []:
        entry = {"model": entry} if isinstance(entry, str) else dict(entry)
        mpath = str(entry["model"])
        models[_name(mpath)] = mpath
        if method != "slerp" and base is not None and mpath == str(base):
            continue  # mergekit lists the base among the models for some methods
        params = _params(entry.get("parameters"), f"{path}: model {mpath}")
        inputs.append({"model": _name(mpath), **params} if params else _name(mpath))
    step: dict[str, Any] = {
        "name": _name(path.stem),
        "method": method,
        "inputs": inputs,
        "params": _params(cfg.get("parameters"), str(path)),
    }
    if base is not None:
        models[_name(str(base))] = str(base)
        if method == "slerp":  # mergekit: t = 0 is the base model
            others = [i for i in inputs if (i if isinstance(i, str) else i["model"]) != _name(str(base))]
            step["inputs"] = [_name(str(base)), *others]
        else:
            step["base"] = _name(str(base))
    tok = cfg.get("tokenizer_source")
    copy_from = (
        _name(str(base))
        if tok in (None, "base") and base is not None
        else (_name(str(tok)) if tok not in (None, "union") else None)
    )
    return {
        "models": models,
        "steps": [step],
        "out_dtype": cfg.get("out_dtype") or cfg.get("dtype"),
        "copy_files_from": copy_from,
    }
