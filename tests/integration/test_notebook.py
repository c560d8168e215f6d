"""notebooks/analysis.ipynb runs top to bottom on the recorded toy results and draws every plot."""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_analysis_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    results = ROOT / "experiments" / "toy_branch_merge" / "results"
    monkeypatch.setenv("BRANCHMERGE_RESULTS", str(results))
    monkeypatch.setenv("BRANCHMERGE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "best mean:" in text and "| data mixture SFT |" in text
    sweeps = sorted(p.parent.name for p in (results / "sweeps").glob("*/results.jsonl"))
    assert sweeps, "recorded sweep results are missing"
    for name in sweeps:
        assert f"{name}:" in text and (tmp_path / name / "pareto.png").stat().st_size > 5000
    assert (tmp_path / "fig2_merge_methods.png").stat().st_size > 5000
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 1 + 2 * len(sweeps)
    assert os.environ["BRANCHMERGE_RESULTS"] == str(results)
