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
A one-step recipe may build its decoder layers from `slices` (layer stacking, mergekit's form; see
branchmerge/merge/slices.py):
      - name: stacked
        method: passthrough               # or any method: each slice merges its inputs' layers
        slices:
          - inputs: [{model: math, layer_range: [0, 16]}]
          - inputs: [{model: code, layer_range: [8, 24], scale: 0.5}]
            base: {model: science, layer_range: [8, 24]}   # methods that need one
            params: {}                                      # this slice's parameters (over the step's)
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

LAYER = re.compile(r"\.layers\.(\d+)\.")


class RecipeError(MergeRecipeError):
    """A recipe that cannot run; the message lists every problem."""


@dataclass
class Input:
    ref: str  # a model name or an earlier step's name
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    """Layers [a, b) of each source (`ranges[ref]`), merged layer by layer by the step's method."""

    inputs: list[Input]
    base: str | None
    ranges: dict[str, tuple[int, int]]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        a, b = next(iter(self.ranges.values()))
        return b - a


@dataclass
class Step:
    name: str
    method: Method
    base: str | None
    inputs: list[Input]
    params: dict[str, Any]
    save: bool = False
    slices: list[Slice] | None = None
    lines: dict[str, float] | None = None  # LiNeS {alpha, beta}, applied by the executor


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {sorted(options)}"


STEP_KEYS = ["method", "base", "inputs", "params", "save", "slices", "lines"]


def _inputs(
    raw: list, method: Method, where: str, problems: list[str], extra: tuple[str, ...] = ()
) -> list[Input]:
    """`[name | {model, <per-model params>, <extra keys>}]` -> Inputs (extra keys stay in params)."""
    inputs = []
    for item in raw or []:
        if isinstance(item, str):
            inputs.append(Input(item))
            continue
        item = dict(item)
        ref = item.pop("model", None)
        if ref is None:
            problems.append(f"{where}: an input mapping needs `model:`")
            continue
        for p in item:
            if p not in method.model_params and p not in extra:
                problems.append(
                    f"{where}: '{p}' is not a per-model parameter of {method.name}"
                    f"{_suggest(p, method.model_params)}"
                )
        inputs.append(Input(str(ref), item))
    return inputs


def _check_params(params: dict, method: Method, where: str, problems: list[str]) -> None:
    for p in params:
        if p not in method.global_params and p not in method.model_params:
            valid = set(method.global_params) | set(method.model_params)
            problems.append(f"{where}: unknown parameter '{p}' for {method.name}{_suggest(p, valid)}")


def _check_count(n: int, method: Method, where: str, problems: list[str]) -> None:
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        lim = (
            method.min_models
            if method.max_models == method.min_models
            else (f"{method.min_models}..{method.max_models or 'any'}")
        )
        problems.append(f"{where}: {method.name} takes {lim} input model(s), got {n}")


def _range(item: Input | dict, where: str, problems: list[str]) -> tuple[int, int] | None:
    params = item.params if isinstance(item, Input) else item
    r = params.pop("layer_range", None)
    ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r)
    if not ok or not 0 <= r[0] < r[1]:
        problems.append(f"{where}: `layer_range: [a, b]` (0 <= a < b, layers a..b-1) is required, got {r!r}")
        return None
    return (int(r[0]), int(r[1]))


def _slices(raw: list, method: Method, where: str, problems: list[str]) -> list[Slice]:
    """A step's `slices:` (see the module docstring); every problem is collected."""
    out = []
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: `slices` is a non-empty list of {{inputs, base, params}}")
        return out
    for k, sl in enumerate(raw):
        at = f"{where}.slices[{k}]"
        sl = dict(sl) if isinstance(sl, dict) else {}
        for key in sorted(set(sl) - {"inputs", "base", "params"}):
            problems.append(f"{at}: unknown key '{key}'{_suggest(key, ['inputs', 'base', 'params'])}")
        inputs = _inputs(sl.get("inputs"), method, at, problems, extra=("layer_range",))
        ranges = {i.ref: _range(i, f"{at} ({i.ref})", problems) for i in inputs}
        base = sl.get("base")
        if base is not None:
            base = dict(base) if isinstance(base, dict) else {"model": base}
            ranges[str(base.get("model"))] = _range(base, f"{at}.base", problems)
            base = str(base.get("model"))
        if len(ranges) < len(inputs) + (base is not None):
            problems.append(f"{at}: a model appears twice among the slice's inputs and base")
        lengths = {b - a for a, b in (r for r in ranges.values() if r)}
        if len(lengths) > 1:
            problems.append(f"{at}: every source of a slice spans the same number of layers, got {ranges}")
        if method.needs_base and base is None:
            problems.append(f"{at}: {method.name} needs a `base: {{model, layer_range}}` in each slice")
        params = dict(sl.get("params") or {})
        _check_params(params, method, at, problems)
        _check_count(len(inputs), method, at, problems)
        if all(ranges.values()):
            out.append(Slice(inputs, base, ranges, params))
    return out


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
        for key in sorted(set(raw) - set(STEP_KEYS)):
            problems.append(f"{where}: unknown key '{key}'{_suggest(key, STEP_KEYS)}")
        try:
            method = get_method(str(raw.get("method")))
        except KeyError as e:
            problems.append(f"{where} ({name}): {e.args[0]}")
            continue
        at = f"{where} ({name})"
        base = raw.get("base")
        inputs = _inputs(raw.get("inputs"), method, at, problems)
        params = dict(raw.get("params") or {})
        _check_params(params, method, at, problems)
        slices = None
        if raw.get("slices") is not None:
            slices = _slices(raw["slices"], method, at, problems)
            if inputs or base or len(raw_steps) > 1:
                problems.append(f"{at}: `slices` replace `inputs`/`base` and make a one-step recipe")
            refs = [r for s in slices for r in s.ranges]
            if method.needs_activations:
                problems.append(f"{at}: {method.name}'s coefficients are per layer of one base: no `slices`")
        else:
            refs = [i.ref for i in inputs] + ([base] if base else [])
            if method.needs_base and not base:
                problems.append(f"{at}: {method.name} needs a `base:`")
            _check_count(len(inputs), method, at, problems)
        for ref in refs:
            if ref not in known:
                problems.append(f"{at}: '{ref}' is neither a model nor an earlier step{_suggest(ref, known)}")
        lines = raw.get("lines")
        problems += _lines_problems(lines, method, at)
        steps.append(Step(name, method, base, inputs, params, bool(raw.get("save", False)), slices, lines))
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
    m = LAYER.search(tensor_name)
    if m and n_layers and n_layers > 1:
        return int(m.group(1)) / (n_layers - 1)
    return 0.0 if "embed" in tensor_name else 1.0


def resolve_value(spec: Any, tensor_name: str, n_layers: int | None, t: float | None = None) -> Any:
    """A parameter's value for one tensor (see the module docstring for the three forms); `t`: the
    depth a per-layer list is read at (default: `layer_fraction` of the name; slices give their own)."""
    if isinstance(spec, dict):
        for pattern, value in spec.items():
            if pattern != "default" and pattern in tensor_name:
                return resolve_value(value, tensor_name, n_layers, t)
        if "default" not in spec:
            raise RecipeError(f"no pattern of {sorted(spec)} matches tensor '{tensor_name}' and no `default`")
        return resolve_value(spec["default"], tensor_name, n_layers, t)
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1:
            return spec[0]
        x = (layer_fraction(tensor_name, n_layers) if t is None else t) * (len(spec) - 1)
        lo = min(int(x), len(spec) - 2)
        return spec[lo] + (spec[lo + 1] - spec[lo]) * (x - lo)
    return spec


def step_params(step: Step, tensor_name: str, n_layers: int | None, t: float | None = None) -> dict[str, Any]:
    """All parameters of a step for one tensor: global ones as values, per-model ones as lists
    (`t`: see `resolve_value`)."""
    m = step.method
    out: dict[str, Any] = {}
    for p, default in m.global_params.items():
        out[p] = resolve_value(step.params.get(p, default), tensor_name, n_layers, t)
    for p, default in m.model_params.items():
        shared = step.params.get(p, default)
        out[p] = [resolve_value(i.params.get(p, shared), tensor_name, n_layers, t) for i in step.inputs]
    if step.lines is not None:
        out["lines"] = step.lines
    return out


def model_paths(models: dict[str, str], inputs_as_paths: list[str]) -> dict[str, Path]:
    """Named models; when no names are given, inputs are folders named by their last path parts."""
    if models:
        return {k: Path(v) for k, v in models.items()}
    return {p: Path(p) for p in inputs_as_paths}
