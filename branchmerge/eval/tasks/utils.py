"""Functions the task YAMLs in this folder name with `!function utils.<name>` (lm-eval's convention).

Every task scores a document by the mean over its samples (pass@1 averaged over n) and also reports
the per-sample verdicts, from which `branchmerge.eval.results` computes standard errors and the
spread across sample seeds.
"""

from __future__ import annotations

import json

from branchmerge.data import benchmarks as D
from branchmerge.verify import graders as G


def load_toy_math(**kw):
    return D.load_toy("math", **kw)


def load_toy_code(**kw):
    return D.load_toy("code", **kw)


def load_toy_science(**kw):
    return D.load_toy("science", **kw)


load_aime24 = D.load_aime24
load_gpqa_diamond = D.load_gpqa_diamond
load_livecodebench = D.load_livecodebench


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def _responses(results: list) -> list[str]:
    flat: list[str] = []
    for r in results:
        flat.extend(r if isinstance(r, list) else [r])
    return flat


def _scored(verdicts: list[bool]) -> dict:
    v = [int(x) for x in verdicts]
    return {"pass@1": sum(v) / max(1, len(v)), "verdicts": v}


def process_toy(doc: dict, results: list) -> dict:
    meta = json.loads(doc["meta"])
    return _scored([G.grade_toy(doc["domain"], r, doc["answer"], meta) for r in _responses(results)])


def process_aime(doc: dict, results: list) -> dict:
    return _scored([G.grade_math(r, doc["answer"]) for r in _responses(results)])


def process_gpqa(doc: dict, results: list) -> dict:
    return _scored([G.grade_letter(r, doc["answer"]) for r in _responses(results)])


def process_lcb(doc: dict, results: list) -> dict:
    tests = json.loads(doc["tests"])
    graded = G.grade_code_many(_responses(results), tests, doc["func_name"] or None)  # concurrently
    return _scored([g["passed"] for g in graded])


def mean_verdicts(items: list) -> float:
    flat = [v for item in items for v in (item if isinstance(item, list) else [item])]
    return sum(flat) / max(1, len(flat))


def keep_all_samples(resps, docs):
    """Filter that keeps every sample of every document (lm-eval keeps only the first by default)."""
    return resps
