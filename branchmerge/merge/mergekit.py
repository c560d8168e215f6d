"""Run mergekit YAML configs: `python merge.py from_mergekit=config.yml output_dir=OUT`.

Converts mergekit's format (merge_method, base_model, models[].parameters, parameters, dtype,
out_dtype, tokenizer_source, chat_template) into our recipe, with mergekit's meanings:
- `merge_method`: any method registered here under one of mergekit's names (`MERGEKIT_METHODS`, the
  20 mergekit registers); a new method file registered under such a name is accepted with no list to
  edit. Our own methods (fisher, importance_fusion, ...) are not mergekit's and are refused here.
- `dtype` is the dtype the arithmetic runs in (our `options.compute_dtype`); without it mergekit
  computes in the stored dtype, and so do we. `out_dtype` is what is written (default: `dtype`, else
  each tensor's stored dtype). So `dtype: bfloat16` computes in bf16, as mergekit does.
- `base_model`: the reference point of methods that take one (`base:`); for linear and slerp it is an
  input (slerp: the t = 0 end), as in mergekit.
- parameters the YAML omits take mergekit's defaults where ours differ (`DEFAULTS`: dare_ties does
  not normalise in mergekit); gradients (lists) and `filter` lists map to our depth lists and
  module-name patterns.
- `slices` (layer stacking): each slice's `sources` (model, layer_range, parameters) become one slice of
  the step (`branchmerge.merge.slices`); the base model is the source that is `base_model` (slice or
  top level), so a method that needs one must list it among the slice's sources, as in mergekit.
- `tokenizer_source` / `tokenizer: {source, tokens, pad_to_multiple_of}` (`union`, `base`, a model):
  the output vocabulary, each input's embedding rows re-indexed to it (`branchmerge.merge.vocab`);
  config.json and the remaining files come from the base (else the first model).
- `chat_template`: a Jinja template, `auto` (the inputs' most common one) or a model's name.
Anything else is a clear error rather than a silently different merge.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from branchmerge.errors import MissingFileError
from branchmerge.foundation import DTYPES
from branchmerge.merge.methods import METHODS
from branchmerge.merge.recipe import RecipeError

# The methods mergekit registers (0.1.5 / a6e4028), by the names its YAML uses.
MERGEKIT_METHODS = frozenset(
    {
        "linear",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "sce",
        "ram",
        "ramplus_tl",
        "model_stock",
        "nearswap",
        "arcee_fusion",
        "passthrough",
    }
)
BASE_IS_INPUT = {"linear", "slerp"}  # mergekit's base_model is one of these methods' inputs
# mergekit's defaults where a YAML may rely on them (applied when the YAML omits the parameter and
# our method has it): its `normalize` differs between variants of one general method.
DEFAULTS = {
    "linear": {"normalize": True},
    "ties": {"normalize": True},
    "dare_ties": {"normalize": False},
    "dare_linear": {"normalize": False},
    "breadcrumbs": {"normalize": False},
    "breadcrumbs_ties": {"normalize": False},
    "della": {"normalize": True},
    "della_linear": {"normalize": False},
}
RENAME = {"lambda": "lambda_"}
IGNORED = {"int8_mask"}  # a flag for mergekit's memory layout only
KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
    "slices",
}
SLICE_KEYS = {"sources", "base_model", "parameters"}


def supported() -> list[str]:
    """mergekit's methods that are registered here (derived from the registry, never a copy)."""
    return sorted(MERGEKIT_METHODS & set(METHODS))


def _check_method(method: Any, path: Path) -> str:
    if method in MERGEKIT_METHODS and method in METHODS:
        return method
    if method in MERGEKIT_METHODS:
        why = f"mergekit's '{method}' has no implementation here yet"
    elif method in METHODS:
        why = f"'{method}' is a branchmerge method, not mergekit's: use it in a recipe (`method: {method}`)"
    else:
        why = f"merge_method '{method}' is not one we run"
    raise RecipeError(f"{path}: {why}; supported from mergekit YAML: {supported()}")


def _value(v: Any) -> Any:
    """mergekit value -> ours: scalar | gradient | [{filter, value}, ..., {value}] -> pattern dict.
    A gradient [v_0, ..., v_m] runs over the decoder layers (t = layer / (L − 1)); mergekit gives every
    tensor outside them (embeddings, final norm, lm_head) t = 0, hence {'.layers.': g, 'default': v_0}."""
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        out: dict[str, Any] = {}
        for item in v:
            if "filter" in item:
                out[str(item["filter"])] = _value(item["value"])
            else:
                out["default"] = _value(item["value"])
        return out
    if isinstance(v, list) and len(v) > 1:
        return {".layers.": v, "default": v[0]}
    return v


def _params(raw: dict | None) -> dict[str, Any]:
    return {RENAME.get(k, k): _value(v) for k, v in (raw or {}).items() if k not in IGNORED}


def _name(path: str) -> str:
    return Path(str(path)).name or str(path)


def _dtype(cfg: dict, key: str, path: Path) -> str | None:
    value = cfg.get(key)
    if value is not None and value not in DTYPES:
        raise RecipeError(f"{path}: {key} '{value}' is not a dtype; use one of {sorted(DTYPES)}")
    return value


def _inputs(cfg: dict, method: str, path: Path) -> tuple[dict[str, str], list[Any], dict | None]:
    """(models by name, the step's inputs, the base model's own input entry if it is listed)."""
    base = cfg.get("base_model")
    models: dict[str, str] = {}
    inputs: list[Any] = []
    base_entry = None
    for raw in cfg.get("models") or []:
        entry = {"model": raw} if isinstance(raw, str) else dict(raw)
        if "model" not in entry:
            raise RecipeError(f"{path}: an entry of `models:` has no `model:` ({entry})")
        mpath = str(entry["model"])
        models[_name(mpath)] = mpath
        params = _params(entry.get("parameters"))
        item = {"model": _name(mpath), **params} if params else _name(mpath)
        if base is not None and mpath == str(base):
            base_entry = item  # mergekit lists the base among the models for some methods
            continue
        inputs.append(item)
    if base is not None:
        models[_name(str(base))] = str(base)
        if method in BASE_IS_INPUT:
            inputs.insert(0, base_entry if base_entry is not None else _name(str(base)))
    return models, inputs, base_entry


def _token_rule(raw: Any, where: str) -> dict[str, Any]:
    """A `tokenizer.tokens` entry with its model paths as our model names."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a token's entry is {{source: ..., force: bool}}, got {raw!r}")
    src = raw.get("source")
    if isinstance(src, dict):
        src = {**src, **({"model": _name(str(src["model"]))} if "model" in src else {})}
    elif src is not None:
        src = _name(str(src))
    return {"source": src, "force": bool(raw.get("force", False))}


def _tokenizer(cfg: dict, models: dict[str, str], path: Path) -> dict[str, Any] | None:
    """`tokenizer_source` / `tokenizer:` -> our spec (`branchmerge.merge.vocab`), or None."""
    block = cfg.get("tokenizer")
    if cfg.get("tokenizer_source") is not None and block is not None:
        raise RecipeError(f"{path}: give `tokenizer_source` or `tokenizer:`, not both (as mergekit)")
    if block is None and cfg.get("tokenizer_source") is None:
        return None
    if block is not None and not isinstance(block, dict):
        raise RecipeError(f"{path}: `tokenizer:` is a mapping {{source, tokens, pad_to_multiple_of}}")
    block = block or {"source": cfg["tokenizer_source"]}
    unknown = set(block) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise RecipeError(f"{path}: unsupported `tokenizer:` keys {sorted(unknown)}")
    source = str(block.get("source", "union"))  # mergekit's default for a `tokenizer:` block
    base = cfg.get("base_model")
    return {
        "source": source if source in ("union", "base") else _name(source),
        "base": _name(str(base)) if base is not None else next(iter(models)),
        "tokens": {
            str(t): _token_rule(r, f"{path}: tokenizer.tokens.{t}")
            for t, r in (block.get("tokens") or {}).items()
        },
        "pad_to_multiple_of": block.get("pad_to_multiple_of"),
    }


def _slices(cfg: dict, method: str, path: Path) -> tuple[dict[str, str], list[dict]]:
    """mergekit `slices:` -> (models by name, our step's slices). The slice's base (its own
    `base_model`, else the top-level one) is the source that names it; linear and slerp take it as
    their first input."""
    models: dict[str, str] = {}
    out = []
    for k, raw in enumerate(cfg.get("slices") or []):
        where = f"{path}: slices[{k}]"
        unknown = set(raw or {}) - SLICE_KEYS
        if unknown:
            raise RecipeError(
                f"{where}: unsupported keys {sorted(unknown)} (supported: {sorted(SLICE_KEYS)})"
            )
        base = raw.get("base_model", cfg.get("base_model"))
        inputs, base_entry = [], None
        for src in raw.get("sources") or []:
            if "model" not in src or "layer_range" not in src:
                raise RecipeError(f"{where}: every source needs `model` and `layer_range` ({src})")
            models[_name(str(src["model"]))] = str(src["model"])
            entry = {"model": _name(str(src["model"])), "layer_range": list(src["layer_range"])}
            entry.update(_params(src.get("parameters")))
            if base is not None and str(src["model"]) == str(base):
                base_entry = entry
            else:
                inputs.append(entry)
        if base_entry is not None and method in BASE_IS_INPUT:
            inputs.insert(0, base_entry)
            base_entry = None
        if base_entry is None and METHODS[method].needs_base:
            raise RecipeError(
                f"{where}: {method} needs the base model among the slice's sources (base_model: {base})"
            )
        sl: dict[str, Any] = {"inputs": inputs, "params": _params(raw.get("parameters"))}
        if base_entry is not None:
            sl["base"] = {"model": base_entry["model"], "layer_range": base_entry["layer_range"]}
        out.append(sl)
    if not out:
        raise RecipeError(f"{path}: `slices:` is empty")
    return models, out


def from_mergekit(path: str | Path) -> dict[str, Any]:
    """{'models': {name: path}, 'steps': [one step], 'compute_dtype', 'out_dtype', 'copy_files_from',
    'chat_template', 'tokenizer'} (dtypes None = the stored dtype; see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"mergekit config {path} does not exist")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise RecipeError(f"{path}: a mergekit config is a mapping (merge_method, models, ...)")
    method = _check_method(cfg.get("merge_method"), path)
    unknown = set(cfg) - KEYS
    if unknown:
        raise RecipeError(f"{path}: unsupported mergekit keys {sorted(unknown)}")
    if bool(cfg.get("slices")) == bool(cfg.get("models")):
        raise RecipeError(f"{path}: give exactly one of `models:` and `slices:` (as mergekit)")
    if cfg.get("slices"):
        models, slices = _slices(cfg, method, path)
        if cfg.get("base_model") is not None:
            models.setdefault(_name(str(cfg["base_model"])), str(cfg["base_model"]))
        inputs = []
    else:
        models, inputs, _ = _inputs(cfg, method, path)
        slices = None
    ours = METHODS[method]
    known = set(ours.global_params) | set(ours.model_params)
    defaults = {k: v for k, v in DEFAULTS.get(method, {}).items() if k in known}
    step: dict[str, Any] = {
        "name": _name(path.stem),
        "method": method,
        "inputs": inputs,
        "params": {**defaults, **_params(cfg.get("parameters"))},
    }
    base = cfg.get("base_model")
    if slices is not None:
        del step["inputs"]
        step["slices"] = slices
    elif base is not None and method not in BASE_IS_INPUT:
        step["base"] = _name(str(base))
    compute = _dtype(cfg, "dtype", path)
    tokenizer = _tokenizer(cfg, models, path)
    files_from = _name(str(base)) if base is not None else None
    if tokenizer is not None and tokenizer["source"] not in ("union", "base"):
        files_from = tokenizer["source"]
        models.setdefault(files_from, str(cfg.get("tokenizer_source") or cfg["tokenizer"]["source"]))
    return {
        "models": models,
        "steps": [step],
        "compute_dtype": compute,
        "out_dtype": _dtype(cfg, "out_dtype", path) or compute,
        "copy_files_from": files_from,
        "chat_template": cfg.get("chat_template"),
        "tokenizer": tokenizer,
    }


def pick_chat_template(spec: str, models: dict[str, Path]) -> str:
    """The Jinja chat template that `chat_template: spec` asks for: the text itself (it holds `{{` or
    `{%`), `auto` (the most common template among the models: chat_template.jinja, else
    tokenizer_config.json), or a model's name (that model's template)."""
    import json

    def template_of(p: Path) -> str | None:
        jinja, f = Path(p) / "chat_template.jinja", Path(p) / "tokenizer_config.json"
        if jinja.is_file():
            return jinja.read_text()
        return json.loads(f.read_text()).get("chat_template") if f.is_file() else None

    if "{{" in spec or "{%" in spec:
        return spec
    if spec == "auto":
        found = [t for t in (template_of(p) for p in models.values()) if isinstance(t, str)]
        if not found:
            raise RecipeError(
                "chat_template: auto found no chat_template in the models' tokenizer_config.json"
            )
        return Counter(found).most_common(1)[0][0]
    if spec in models:
        t = template_of(models[spec])
        if isinstance(t, str):
            return t
        raise RecipeError(f"chat_template: {spec}: {models[spec]}/tokenizer_config.json has no chat_template")
    raise RecipeError(
        f"chat_template '{spec}' is neither a Jinja template, `auto`, nor one of the models {sorted(models)}"
    )
