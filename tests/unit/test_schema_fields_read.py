"""Every field of the config schemas is read somewhere: a key that nothing reads is a promise the code
does not keep (a user sets it and nothing changes).

A field counts as read when the package (outside the schema files) or a config interpolation names it:
an attribute access `.name`, a string "name" (`cfg["name"]`, `getattr(cfg, "name")`, `.get("name")`),
or `${...name}` in conf/. Names are matched, not owners: a field named like an attribute of
something else (say `notes` beside a plan's `.notes`) passes unnoticed, so prefer specific names.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import branchmerge.config.schema as schema  # first: it imports distill_schema at its end
from branchmerge.config import distill_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILES = {Path(schema.__file__).resolve(), Path(distill_schema.__file__).resolve()}


def names_used(source: str) -> set[str]:
    """Attribute names and string constants in `source`."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)
    return out


def read_names() -> set[str]:
    files = [p for p in (ROOT / "branchmerge").rglob("*.py") if p.resolve() not in SCHEMA_FILES]
    files += [ROOT / f for f in ("train.py", "merge.py", "evaluate.py", "distill.py")]
    used = set().union(*(names_used(p.read_text()) for p in files))
    for y in (ROOT / "conf").rglob("*.yaml"):
        used |= set(re.findall(r"\$\{[\w.]*?\.?(\w+)\}", y.read_text()))
    return used


def schema_fields() -> list[tuple[str, str]]:
    out = []
    for module in (schema, distill_schema):
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                out += [(obj.__name__, f.name) for f in dataclasses.fields(obj)]
    return out


def test_every_schema_field_is_read_somewhere():
    """Guards against a dead key such as the former `DataConfig.val_files` or `ModelConfig.notes`:
    set in configs, validated, and read by nothing."""
    used = read_names()
    dead = [f"{cls}.{name}" for cls, name in schema_fields() if name not in used]
    assert not dead, f"schema fields read nowhere (implement or remove them): {dead}"


def test_a_planted_dead_field_is_reported():
    @dataclasses.dataclass
    class Planted:
        val_every_n_steps: int | None = None

    used = read_names()
    assert [f.name for f in dataclasses.fields(Planted) if f.name not in used] == ["val_every_n_steps"]
