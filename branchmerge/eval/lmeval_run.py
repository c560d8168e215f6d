"""Build our lm-eval tasks and run them on a model: one call of lm-eval's `evaluate` per task.

    tasks = {spec.name: build_task(spec, cfg) for spec in cfg.eval.tasks}
    with reference_runs(tasks, cfg.eval.tasks):          # toy code: reference programs, beside generation
        rows = run_task(lm, tasks[spec.name], spec, cfg)   # one dict per (question, sample)

Every task of the suite is built before the first one runs, so the toy code task's reference
programs (branchmerge/eval/prefetch.py) start on the sandbox workers beside the whole suite's
generation, not only beside the code task's own. `run_task` seeds python, numpy and torch and sets
the few-shot seed and count as `lm_eval.simple_evaluate` does, then calls `lm_eval.evaluator.evaluate`
itself: simple_evaluate's extra work is a report of the environment (git, `pip list` in a
subprocess, collect_env) that we do not read and that cost about a second per task.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

from branchmerge.verify.extract import opened_think

TASK_DIR = Path(__file__).parent / "tasks"
PER_SAMPLE_DOCS = {"gpqa_diamond"}  # one document per (question, sample): n goes to the loader


def build_task(spec: Any, cfg: Any) -> Any:
    """The lm-eval Task of `spec` (our YAML in TASK_DIR) with its samples, sampling and token budget."""
    from lm_eval.tasks import TaskManager, get_task_dict

    meta = {"data_dir": cfg.data_dir, "toy_dir": cfg.toy_dir, "seed": cfg.seed, "n_samples": spec.n}
    meta["split"] = spec.split  # test or val (the loaders of the real benchmarks refuse val)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
    task = get_task_dict([spec.name], tm)[spec.name]
    task.set_config("repeats", 1 if spec.name in PER_SAMPLE_DOCS else spec.n)
    gen = {"until": [], "do_sample": spec.temperature > 0, "max_gen_toks": spec.max_gen_toks}
    if spec.temperature > 0:
        gen.update(temperature=spec.temperature, top_p=spec.top_p)
    task.set_config("generation_kwargs", gen)
    return task


def run_task(lm: Any, task: Any, spec: Any, cfg: Any) -> list[dict]:
    """Generate and grade `task` (seeded as simple_evaluate seeds); one row per (question, sample)."""
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if task.get_config("num_fewshot") is None:
        task.set_config("num_fewshot", 0)
    task.set_fewshot_seed(seed=cfg.seed)
    out = evaluate(
        lm=lm,
        task_dict={spec.name: task},
        limit=spec.limit,
        bootstrap_iters=0,
        log_samples=True,
        apply_chat_template=True,
        confirm_run_unsafe_code=True,
    )
    return [row for s in out["samples"][spec.name] for row in _rows(s, spec.name)]


def _rows(s: dict, name: str) -> list[dict]:
    """The logged sample `s` of one document: one row per generation, with its verdict."""
    responses = [r for group in s["filtered_resps"] for r in (group if isinstance(group, list) else [group])]
    opened = opened_think(s["arguments"][0][0]) if s.get("arguments") else ""
    doc = s["doc"]
    return [
        {
            "task": name,
            "doc_id": s["doc_id"],
            "question": str(doc.get("id")),
            "sample": int(doc.get("sample", k)),
            "shuffle_seed": doc.get("shuffle_seed"),
            "reference": doc.get("answer"),
            "response": resp,
            "opened_by_prompt": opened if resp.startswith(opened) else "",
            "verdict": int(verdict),
        }
        for k, (resp, verdict) in enumerate(zip(responses, s["verdicts"]))
    ]


def reference_runs(tasks: dict[str, Any], specs: list[Any], store: Any = None):
    """Context: the toy code task's reference programs (its first `limit` documents) run on the
    sandbox workers while the suite generates; `store` (a GenerationStore) keeps their outputs across
    evaluations. A suite without toy_code: nothing to run."""
    spec = next((s for s in specs if s.name == "toy_code"), None)
    if spec is None:
        return contextlib.nullcontext()
    from branchmerge.eval.prefetch import ReferenceRuns, reference_programs

    docs = tasks[spec.name].eval_docs
    n = len(docs) if spec.limit is None else min(spec.limit, len(docs))
    return ReferenceRuns(reference_programs([docs[i] for i in range(n)]), store=store)
