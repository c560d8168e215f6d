"""Merge recipes: a list of steps over named models, validated before any tensor is read.

    models: {science: outputs/train/science_branch/export, math: ..., code: ...}
    steps:
      - name: math_science                 # an intermediate: lives only in memory unless save: true
        method: arcee_fusion
        base: science
        inputs: [math]
        params: {k: 1.5}
      - name: tinyr1
        method: arcee_fusion
        base: code
        inputs: [math_science]            # an earlier step
The last step is the output. An input may carry per-model parameters: `{model: math, weight: 0.7}`.
A step with a base may take `lines: {alpha: 0.5, beta: 0.5}`: its merged task vector is scaled by depth,
λ = α + β·ℓ/(L−1) in block ℓ, α outside the blocks (LiNeS, `executor.lines_scale`).
A parameter value is a number, a list (interpolated linearly over layer depth: [0.2, 0.8] goes from
0.2 at the first layer to 0.8 at the last), or a mapping from module-name patterns to values
(`{self_attn: 0.3, mlp: 0.7, default: 0.5}`; the first pattern found in the tensor name wins).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchmerge.errors import MergeRecipeError
from branchmerge.merge.methods import Method, get_method

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class RecipeError(MergeRecipeError):
    """A recipe that cannot run; the message lists every problem."""


@dataclass
class Input:
    ref: str  # a model name or an earlier step's name
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    name: str
    method: Method
    base: str | None
    inputs: list[Input]
    params: dict[str, Any]
    save: bool = False
    lines: dict[str, float] | None = None  # LiNeS {alpha, beta}, applied by the executor


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {sorted(options)}"


def parse_steps(raw_steps: list[dict], model_names: set[str]) -> list[Step]:
    problems: list[str] = []
    steps: list[Step] = []
    known = set(model_names)
    if not raw_steps:
        raise RecipeError("the recipe has no steps: give `steps:` or a single-step `method:` + `inputs:`")
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]"
        raw = dict(raw)
        name = str(raw.pop("name", f"step{i}"))
        extra = set(raw) - {"method", "base", "inputs", "params", "save", "lines"}
        for key in sorted(extra):
            problems.append(
                f"{where}: unknown key '{key}'{_suggest(key, ['method', 'base', 'inputs', 'params', 'save', 'lines'])}"
            )
        try:
            method = get_method(str(raw.get("method")))
        except KeyError as e:
            problems.append(f"{where} ({name}): {e.args[0]}")
            continue
        base = raw.get("base")
        inputs = []
        for item in raw.get("inputs") or []:
            if isinstance(item, str):
                inputs.append(Input(item))
            else:
                item = dict(item)
                ref = item.pop("model", None)
                if ref is None:
                    problems.append(f"{where}: an input mapping needs `model:`")
                    continue
                for p in item:
                    if p not in method.model_params:
                        problems.append(
                            f"{where} ({name}): '{p}' is not a per-model parameter of {method.name}"
                            f"{_suggest(p, method.model_params)}"
                        )
                inputs.append(Input(str(ref), item))
        params = dict(raw.get("params") or {})
        for p in params:
            if p not in method.global_params and p not in method.model_params:
                valid = set(method.global_params) | set(method.model_params)
                problems.append(
                    f"{where} ({name}): unknown parameter '{p}' for {method.name}{_suggest(p, valid)}"
                )
        for ref in [i.ref for i in inputs] + ([base] if base else []):
            if ref not in known:
                problems.append(
                    f"{where} ({name}): '{ref}' is neither a model nor an earlier step{_suggest(ref, known)}"
                )
        if method.needs_base and not base:
            problems.append(f"{where} ({name}): {method.name} needs a `base:`")
        n = len(inputs)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            lim = (
                method.min_models
                if method.max_models == method.min_models
                else (f"{method.min_models}..{method.max_models or 'any'}")
            )
            problems.append(f"{where} ({name}): {method.name} takes {lim} input model(s), got {n}")
        lines = raw.get("lines")
        problems += _lines_problems(lines, method, f"{where} ({name})")
        steps.append(Step(name, method, base, inputs, params, bool(raw.get("save", False)), lines))
        known.add(name)
    if problems:
        raise RecipeError("invalid merge recipe:\n" + "\n".join(f"  - {p}" for p in problems))
    return steps


def _lines_problems(lines: Any, method: Method, where: str) -> list[str]:
    if lines is None:
        return []
    if not method.needs_base:
        return [f"{where}: lines scales task vectors θ − B; {method.name} has no base (drop `lines`)"]
    ok = isinstance(lines, dict) and set(lines) == {"alpha", "beta"}
    if not ok or not all(isinstance(v, (int, float)) for v in lines.values()):
        return [f"{where}: lines must be {{alpha: number, beta: number}}, got {lines!r}"]
    return []


def layer_fraction(tensor_name: str, n_layers: int | None) -> float:
    """Depth of a tensor in [0, 1]: its layer index / (L−1); embeddings 0, everything after the layers 1."""
    m = _LAYER.search(tensor_name)
    if m and n_layers and n_layers > 1:
        return int(m.group(1)) / (n_layers - 1)
    return 0.0 if "embed" in tensor_name else 1.0


def resolve_value(spec: Any, tensor_name: str, n_layers: int | None) -> Any:
    """A parameter's value for one tensor (see the module docstring for the three forms)."""
    if isinstance(spec, dict):
        for pattern, value in spec.items():
            if pattern != "default" and pattern in tensor_name:
                return resolve_value(value, tensor_name, n_layers)
        if "default" not in spec:
            raise RecipeError(f"no pattern of {sorted(spec)} matches tensor '{tensor_name}' and no `default`")
        return resolve_value(spec["default"], tensor_name, n_layers)
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1:
            return spec[0]
        x = layer_fraction(tensor_name, n_layers) * (len(spec) - 1)
        lo = min(int(x), len(spec) - 2)
        return spec[lo] + (spec[lo + 1] - spec[lo]) * (x - lo)
    return spec


def step_params(step: Step, tensor_name: str, n_layers: int | None) -> dict[str, Any]:
    """All parameters of a step for one tensor: global ones as values, per-model ones as lists."""
    m = step.method
    out: dict[str, Any] = {}
    for p, default in m.global_params.items():
        out[p] = resolve_value(step.params.get(p, default), tensor_name, n_layers)
    for p, default in m.model_params.items():
        shared = step.params.get(p, default)
        out[p] = [resolve_value(i.params.get(p, shared), tensor_name, n_layers) for i in step.inputs]
    if step.lines is not None:
        out["lines"] = step.lines
    return out


def model_paths(models: dict[str, str], inputs_as_paths: list[str]) -> dict[str, Path]:
    """Named models; when no names are given, inputs are folders named by their last path parts."""
    if models:
        return {k: Path(v) for k, v in models.items()}
    return {p: Path(p) for p in inputs_as_paths}
