"""The layer rule of docs/architecture.md, read from the source files: a module imports only from its own
layer or a layer below it, and the four stages of layer 2 do not import one another.

    entry points (train.py, merge.py, evaluate.py, distill.py, branchmerge.demo)     6
    toy world (branchmerge.toy): uses the stages, is imported by none               5
    report: tables and plots of what the stages wrote                                4
    sweep: merge + evaluate trials                                                   3
    stages: distill, train, merge, eval (no stage imports another)                  2
    verification: branchmerge.verify (extract, graders, sandbox)                     1
    foundations: foundation, errors, config, data, models, hf_io, lm_loss, utils     0
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_SCRIPTS = ("train.py", "merge.py", "evaluate.py", "distill.py")
LAYERS = {
    "foundation": 0,
    "errors": 0,
    "config": 0,
    "data": 0,
    "models": 0,
    "hf_io": 0,
    "lm_loss": 0,
    "utils": 0,
    "verify": 1,
    "distill": 2,
    "train": 2,
    "merge": 2,
    "eval": 2,
    "sweep": 3,
    "report": 4,
    "toy": 5,
    "demo": 6,
    "__entry__": 6,
}
PEERS = {2}  # within this layer a package may not import a sibling package


def layer_key(module: str) -> str:
    """`branchmerge.merge.io` -> "merge"; an entry script -> "__entry__"."""
    parts = module.split(".")
    return parts[1] if parts[0] == "branchmerge" and len(parts) > 1 else "__entry__"


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every `branchmerge` import in `source`, including imports inside functions."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("branchmerge")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "branchmerge":
                out += [(node.lineno, f"branchmerge.{a.name}") for a in node.names]
            elif node.module.startswith("branchmerge."):
                out.append((node.lineno, node.module))
    return out


def violations(module: str, source: str) -> list[str]:
    """Every import in `source` (the text of `module`) that crosses the layer rule, as one line each."""
    here = layer_key(module)
    bad = []
    for line, target in imported_modules(source):
        there = layer_key(target)
        if there == here or there not in LAYERS:
            continue
        upward = LAYERS[there] > LAYERS[here]
        sideways = LAYERS[there] == LAYERS[here] and LAYERS[here] in PEERS
        if upward or sideways:
            bad.append(f"{module}:{line} imports {target} ({here} -> {there})")
    return bad


def package_modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "branchmerge").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        mods[".".join(rel.parts).removesuffix(".__init__")] = path
    for script in ENTRY_SCRIPTS:
        mods[script.removesuffix(".py")] = ROOT / script
    return mods


def test_every_package_has_a_layer():
    """A new top-level package or module must be placed in the rule (and in docs/architecture.md)."""
    keys = {layer_key(m) for m in package_modules() if m != "branchmerge"}
    assert keys <= set(LAYERS), f"place {sorted(keys - set(LAYERS))} in LAYERS and docs/architecture.md"


def test_no_import_crosses_the_layer_rule():
    bad = [v for m, p in package_modules().items() for v in violations(m, p.read_text())]
    assert not bad, "imports that cross docs/architecture.md's layer rule:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("branchmerge.eval.harness", "from branchmerge.merge.provenance import file_hash\n"),
        ("branchmerge.merge.importance", "def f():\n    from branchmerge.train.module import x\n"),
        ("branchmerge.models", "from branchmerge.toy.tokenizer import padded_vocab_size\n"),
        ("branchmerge.verify.graders", "import branchmerge.eval.harness\n"),
        ("branchmerge.distill.pipeline", "from branchmerge import toy\n"),
    ],
)
def test_a_planted_upward_or_sideways_import_is_caught(module, planted):
    """The bugs the rule guards against, planted into a real module's source: the checker must report
    each one (an upward import, an import between peer stages, one hidden inside a function)."""
    source = package_modules()[module].read_text() + "\n" + planted
    assert len(violations(module, source)) == 1


def test_foundation_module_imports_no_branchmerge_module():
    """branchmerge/foundation.py is the bottom of the stack: it must stand alone."""
    assert imported_modules((ROOT / "branchmerge" / "foundation.py").read_text()) == []
