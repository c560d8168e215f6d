"""`python evaluate.py model_path=<HF folder> eval=<suite>`: lm-evaluation-harness with our task YAMLs.

For each task of the suite: our YAML (branchmerge/eval/tasks/, found through lm-eval's include path)
is loaded, its samples-per-question, sampling and token budget are set from the suite, lm-eval runs
it on the chosen backend (HF on CPU, vLLM on GPU) with the model's own chat template, and we write

    <run dir>/results.json    per task: pass@1 (mean over samples), its standard error over questions,
                              the spread of the per-sample-index scores (seeds), mean generated tokens,
                              the share of generations that hit the token cap, and every setting
                              that moves a score (n, seed, temperature, top-p, max tokens, template,
                              backend, batch size, dataset file hash, model folder hash)
    <run dir>/samples.jsonl   one line per (task, question, sample): prompt id, response, verdict
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import EvalConfig
from branchmerge.eval import sandbox
from branchmerge.eval.results import summarize_task
from branchmerge.merge.provenance import file_hash, versions

log = logging.getLogger(__name__)
TASK_DIR = Path(__file__).parent / "tasks"
PER_SAMPLE_DOCS = {"gpqa_diamond"}  # one document per (question, sample): n goes to the loader
CODE_TASKS = {"toy_code", "livecodebench"}  # graded by running generated programs in the sandbox


def model_hash(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{file_hash(f)}".encode())
    return h.hexdigest()


def build_lm(cfg: Any):
    if cfg.backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(
            pretrained=cfg.model_path,
            device=cfg.device,
            batch_size=cfg.batch_size,
            dtype=cfg.dtype,
            max_length=cfg.max_model_len,
        )
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(
        pretrained=cfg.model_path,
        tensor_parallel_size=cfg.tensor_parallel_size,
        dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        batch_size="auto",
        seed=cfg.seed,
    )


def _dataset_file(task: str, cfg: Any) -> Path | None:
    from branchmerge.eval.datasets import SOURCES

    if task.startswith("toy_"):
        return Path(cfg.toy_dir) / "data" / task.removeprefix("toy_") / "test.jsonl"
    return Path(cfg.data_dir) / SOURCES[task][0] if task in SOURCES else None


def run_task(lm: Any, spec: Any, cfg: Any) -> tuple[dict, list[dict]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    meta = {"data_dir": cfg.data_dir, "toy_dir": cfg.toy_dir, "seed": cfg.seed, "n_samples": spec.n}
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
    task = get_task_dict([spec.name], tm)[spec.name]
    per_doc = spec.name in PER_SAMPLE_DOCS
    task.set_config("repeats", 1 if per_doc else spec.n)
    gen = {"until": [], "do_sample": spec.temperature > 0, "max_gen_toks": spec.max_gen_toks}
    if spec.temperature > 0:
        gen.update(temperature=spec.temperature, top_p=spec.top_p)
    task.set_config("generation_kwargs", gen)
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        apply_chat_template=True,
        log_samples=True,
        limit=spec.limit,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        bootstrap_iters=0,
        confirm_run_unsafe_code=True,
        task_manager=tm,  # without it lm-eval indexes its ~13k bundled task YAMLs again (~7 s a task)
    )
    rows = []
    for s in out["samples"][spec.name]:
        responses = [
            r for group in s["filtered_resps"] for r in (group if isinstance(group, list) else [group])
        ]
        for k, (resp, verdict) in enumerate(zip(responses, s["verdicts"])):
            doc = s["doc"]
            rows.append(
                {
                    "task": spec.name,
                    "doc_id": s["doc_id"],
                    "question": str(doc.get("id")),
                    "sample": int(doc.get("sample", k)),
                    "shuffle_seed": doc.get("shuffle_seed"),
                    "reference": doc.get("answer"),
                    "response": resp,
                    "verdict": int(verdict),
                }
            )
    return out, rows


def evaluate(cfg: DictConfig) -> dict:
    cfg = validate(cfg, EvalConfig)
    code = any(t.name in CODE_TASKS for t in cfg.eval.tasks)
    sandbox.configure(cfg.sandbox.isolation, cfg.sandbox.workers, verify_now=code)
    model_path = Path(cfg.model_path)
    if not (model_path / "config.json").exists():
        raise FileNotFoundError(
            f"model_path={model_path} is not a Hugging Face model folder (no config.json)"
        )
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    lm = build_lm(cfg)
    tokenizer = lm.tokenizer
    results: dict[str, Any] = {
        "model": {"path": str(model_path.resolve()), "hash": model_hash(model_path)},
        "suite": cfg.eval.name,
        "backend": cfg.backend,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "versions": {**versions(), **_lm_eval_version()},
        "sandbox": sandbox.provenance(),  # how generated code ran; a `warning` when not isolated
        "tasks": {},
    }
    samples_path = run_dir / "samples.jsonl"
    with samples_path.open("w") as f:
        for spec in cfg.eval.tasks:
            t1 = time.time()
            _, rows = run_task(lm, spec, cfg)
            for r in rows:
                r["n_tokens"] = len(tokenizer(r["response"], add_special_tokens=False)["input_ids"])
                f.write(json.dumps(r) + "\n")
            data_file = _dataset_file(spec.name, cfg)
            summary = summarize_task(rows, spec.max_gen_toks)
            summary.update(
                {
                    "n": spec.n,
                    "temperature": spec.temperature,
                    "top_p": spec.top_p,
                    "max_gen_toks": spec.max_gen_toks,
                    "limit": spec.limit,
                    "seconds": round(time.time() - t1, 1),
                    "dataset_file": str(data_file) if data_file else None,
                    "dataset_hash": file_hash(data_file) if data_file and data_file.exists() else None,
                }
            )
            results["tasks"][spec.name] = summary
            log.info(
                "%s: pass@1 %.4f ± %.4f (n=%d, %d questions)",
                spec.name,
                summary["pass@1"],
                summary["stderr"],
                spec.n,
                summary["questions"],
            )
    results["seconds"] = round(time.time() - t0, 1)
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.info("results: %s", run_dir / "results.json")
    return results


def _lm_eval_version() -> dict[str, str]:
    import importlib.metadata as md

    return {"lm_eval": md.version("lm_eval")}
