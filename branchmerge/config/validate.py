"""Validate a composed Hydra config against a dataclass schema, reporting every problem at once.

    validate(cfg, TrainConfig)   # raises ConfigError listing each bad key with its full path

Checks: unknown keys (with the closest known key as a suggestion), missing required keys, and types
(str, int, float, bool, None-able, Literal choices, lists, dicts and nested dataclasses). Keys of
objects built by Hydra (`_target_`, `_partial_`, ...) are passed through where the schema says `dict`.
Interpolations are resolved first, so `${paths.x}` errors name the key that used them. A schema class
may add rules across its fields as a static `problems(value, key) -> list[str]` (EvalTaskConfig does).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from branchmerge.errors import ConfigError


def problems_error(problems: list[str], schema_name: str) -> ConfigError:
    """One ConfigError listing every problem (one line each when there is a single one)."""
    fix = "fix the key in the YAML file or the command-line override (see conf/ and `--cfg job`)"
    if len(problems) == 1:
        return ConfigError(f"{schema_name} config: {problems[0]}; {fix}", problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return ConfigError(
        f"{len(problems)} problems in the {schema_name} config:\n{lines}\n{fix[0].upper()}{fix[1:]}.",
        problems,
    )


def validate(cfg: DictConfig | dict, schema: type) -> DictConfig:
    """`cfg` resolved, with the schema's defaults filled in, as a read-only DictConfig; raise
    ConfigError listing every problem otherwise."""
    problems: list[str] = []
    try:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except Exception as e:  # an interpolation that cannot resolve
        raise problems_error([f"cannot resolve config: {e}"], schema.__name__) from e
    _check(data, schema, "", problems)
    if problems:
        raise problems_error(problems, schema.__name__)
    out = OmegaConf.create(data)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, key: str, problems: list[str]) -> None:
    where = key or "<root>"
    origin = typing.get_origin(tp)
    if tp is Any:
        return
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return
        errs: list[list[str]] = []
        for opt in options:
            if opt is type(None):
                continue
            sub: list[str] = []
            _check(value, opt, key, sub)
            if not sub:
                return
            errs.append(sub)
        problems.extend(
            min(errs, key=len)
            if len(errs) == 1
            else [f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}"]
        )
        return
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping ({tp.__name__}), got {value!r}")
            return
        _check_dataclass(value, tp, key, problems)
        return
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return
        args = typing.get_args(tp)
        if args:
            for i, v in enumerate(value):
                _check(v, args[0], f"{key}[{i}]", problems)
        return
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return
        args = typing.get_args(tp)
        if args:
            for k, v in value.items():
                _check(v, args[1], f"{key}.{k}" if key else str(k), problems)
        return
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_dataclass(value: dict, tp: type, key: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    for k in value:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{_join(key, close[0])}'?" if close else f"; known keys: {sorted(fields)}"
            problems.append(f"{_join(key, k)}: unknown key{hint}")
    for name, f in fields.items():
        if name not in value:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                problems.append(f"{_join(key, name)}: missing required key")
            else:  # fill the default, so code downstream sees every field
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                value[name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
            continue
        _check(value[name], hints[name], _join(key, name), problems)
    rules = getattr(tp, "problems", None)  # a schema's own rules across its fields
    if callable(rules):
        problems.extend(rules(value, key or "<root>"))


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)
