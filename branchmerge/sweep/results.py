"""A sweep's results table: one JSON line per trial, a CSV beside it, and the keep-only-the-best rule.

    <sweep dir>/results.jsonl   {"trial", "status", "params", "scores": {task: {pass@1, stderr}},
                                 "objective", "weights_kept", "model_dir", ...} per line
    <sweep dir>/results.csv     the same, flat: one column per parameter and per task

After a Hydra sweep the winner's row also carries `test` ({suite, scores, objective}: the winner scored
on the test split, see winner.py), flattened to `test_objective` and `test_<task>` columns.

Trials may finish concurrently (a Hydra launcher with several workers, several W&B agents): every
update takes an exclusive lock on <results>.lock and rewrites the files atomically.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_results(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def record_trial(path: Path, row: dict, keep: str, direction: str) -> None:
    """Append `row` (replacing an earlier row of the same trial folder) and apply the weights policy:
    `all` keeps every trial's weights, `none` deletes this one's, `best` keeps only the best trial's."""
    path = Path(path)
    with _locked(path):
        rows = [r for r in load_results(path) if r["run_dir"] != row["run_dir"]]
        row = {**row, "weights_kept": row["status"] == "ok"}
        if row["status"] == "ok" and keep == "none":
            row["weights_kept"] = _delete_weights(Path(row["model_dir"]))
        elif row["status"] == "ok" and keep == "best":
            kept = [r for r in rows if r.get("weights_kept")]
            best = max(
                kept,
                key=lambda r: r["objective"] if direction == "maximize" else -r["objective"],
                default=None,
            )
            if best is None or _better(row["objective"], best["objective"], direction):
                for r in kept:
                    r["weights_kept"] = _delete_weights(Path(r["model_dir"]))
            else:
                row["weights_kept"] = _delete_weights(Path(row["model_dir"]))
        rows.append(row)
        _write(path, rows)


def pick_winner(rows: list[dict], direction: str = "maximize") -> dict | None:
    """The successful trial with the best objective (the first of equals), or None if none succeeded."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    return max(ok, key=lambda r: sign * r["objective"])


def record_test(path: Path, run_dir: str, test: dict) -> None:
    """Put the winner's test scores on its row (`test`) and take them off any other row (a rerun that
    extended the sweep may have crowned another trial)."""
    path = Path(path)
    with _locked(path):
        rows = load_results(path)
        for r in rows:
            r.pop("test", None)
            if r["run_dir"] == run_dir:
                r["test"] = test
        _write(path, rows)


def _delete_weights(model_dir: Path) -> bool:
    """Remove the weight files (config, tokenizer, provenance of what was merged stay, renamed so the
    merge is not mistaken for a finished one). Returns False: the weights are no longer kept."""
    for pattern in WEIGHT_FILES:
        for f in model_dir.glob(pattern):
            f.unlink()
    prov = model_dir / "merge_provenance.json"
    if prov.exists():
        prov.rename(model_dir / "merge_provenance.weights_deleted.json")
    log.info("deleted the weights of %s (score.keep_weights)", model_dir)
    return False


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    table = flatten(rows)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]) if table else [])
        w.writeheader()
        w.writerows(table)
    os.replace(tmp, path.with_suffix(".csv"))


def flatten(rows: list[dict]) -> list[dict]:
    """One flat dict per trial: trial, status, each parameter, each task's pass@1 and stderr, objective.
    Every dict has the same keys (a column only some trials have, such as the winner's `test_*`
    scores or a failed trial's missing task, is None on the others), so the rows form a table."""
    out = []
    for r in rows:
        flat = {"trial": r["trial"], "status": r["status"]}
        flat.update(r["params"])
        for task, s in r["scores"].items():
            flat[task] = s["pass@1"]
            flat[f"{task}_stderr"] = s["stderr"]
        flat.update(objective=r["objective"], weights_kept=r.get("weights_kept"), error=r.get("error"))
        test = r.get("test") or {}
        if test.get("scores"):
            flat["test_objective"] = test.get("objective")
            flat.update({f"test_{task}": s["pass@1"] for task, s in test["scores"].items()})
        out.append(flat)
    cols = list(dict.fromkeys(k for flat in out for k in flat))
    return [{c: flat.get(c) for c in cols} for flat in out]


def copy_best(path: Path, dest: Path, direction: str = "maximize") -> Path:
    """Copy the best trial's merged folder to `dest` (it must still hold its weights)."""
    best = pick_winner(load_results(path), direction)
    if best is None:
        raise ValueError(f"{path} has no successful trial")
    if not best.get("weights_kept"):
        raise FileNotFoundError(f"the best trial's weights were deleted: {best['model_dir']}")
    shutil.copytree(best["model_dir"], dest)
    return dest
