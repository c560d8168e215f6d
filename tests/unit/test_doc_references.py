"""Every Markdown document the repository refers to exists in it: a reference to a file a user does not
have after cloning (a private note, a moved doc) cannot be followed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a document: anything under docs/, or a file named in capitals (a README); lower-case .md
# names elsewhere are outputs the code writes (table.md), not references
DOC_REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*(?:[A-Z][A-Z0-9_-]*|(?<=docs/)[\w.-]+)\.md)\b")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".ipynb", ""}


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.splitlines() if Path(f).suffix in SUFFIXES and (ROOT / f).is_file()]


def dangling(path: Path, text: str) -> list[str]:
    """`file:line: ref` for each .md reference in `text` found neither from the root nor beside `path`."""
    bad = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        for ref in DOC_REF.findall(line):
            if ref.startswith("http") or "://" in line and f"/{ref}" in line:
                continue
            if not ((ROOT / ref).exists() or (path.parent / ref).exists()):
                bad.append(f"{path.relative_to(ROOT)}:{lineno}: {ref}")
    return bad


def test_every_referenced_doc_exists():
    bad = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():  # its planted example names missing docs on purpose
            continue
        try:
            bad += dangling(path, path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    assert not bad, "references to documents that are not in the repository:\n" + "\n".join(bad)


def test_a_planted_reference_to_a_missing_doc_is_caught():
    """The bug this guards against: a comment citing a file the repository does not ship."""
    planted = "# the merge follows NOTES.md, 'Merge'; see docs/method.md and docs/missing.md\n"
    got = dangling(ROOT / "branchmerge" / "x.py", planted)
    assert got == ["branchmerge/x.py:1: NOTES.md", "branchmerge/x.py:1: docs/missing.md"]
