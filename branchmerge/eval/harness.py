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

dtype=auto (the default) runs the checkpoint's own dtype (config.json `dtype`/`torch_dtype`) on GPU
backends, float32 for hf on CPU; results.json records both the setting and the dtype it resolved to.
vLLM runs data_parallel_size replicas of tensor_parallel_size GPUs each; their product must not
exceed the visible GPUs. Templates that open the think block in the prompt (R1-family: the prompt
ends with `<think>\\n`) get that opening put back in front of each generation before grading
(`reopen_think`), so a generation cut off before `</think>` counts as unanswered instead of being
graded on a box inside its unfinished reasoning; results.json counts these per task (`unclosed_think`).
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
from branchmerge.errors import ConfigError, EvaluationError, MissingFileError
from branchmerge.eval.gencache import GenerationStore, cache_generations, model_key
from branchmerge.eval.lmeval_run import build_task, reference_runs, run_task
from branchmerge.eval.results import summarize_task
from branchmerge.foundation import file_hash, versions
from branchmerge.verify import sandbox
from branchmerge.verify.extract import THINK_CLOSE, THINK_OPEN, reopen_think

log = logging.getLogger(__name__)
CODE_TASKS = {"toy_code", "livecodebench"}  # graded by running generated programs in the sandbox


def model_hash(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{file_hash(f)}".encode())
    return h.hexdigest()


def resolve_dtype(cfg: Any) -> str:
    """The dtype the model runs in: cfg.dtype, or for `auto` float32 on CPU hf and otherwise the
    checkpoint's own (config.json `dtype`, or `torch_dtype` in older files; float32 when absent)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if cfg.backend == "hf" and str(cfg.device).startswith("cpu"):
        return "float32"
    config = json.loads((Path(cfg.model_path) / "config.json").read_text())
    own = config.get("dtype") or config.get("torch_dtype") or "float32"
    if own not in ("float32", "bfloat16", "float16"):
        raise EvaluationError(
            f"{cfg.model_path}/config.json: dtype {own!r} is not float32/bfloat16/float16; "
            "run it in one of those with dtype=float32 (or bfloat16, float16)"
        )
    return own


def check_gpus(cfg: Any, visible: int, has_ray: bool) -> None:
    """Refuse a parallel layout that cannot run, before any model is loaded."""
    tp, dp = cfg.tensor_parallel_size, cfg.data_parallel_size
    if tp < 1 or dp < 1:
        raise ConfigError(f"tensor_parallel_size={tp} and data_parallel_size={dp} must be at least 1")
    if cfg.backend != "vllm":
        if tp * dp > 1:
            raise ConfigError(
                f"tensor_parallel_size={tp} / data_parallel_size={dp} need backend=vllm (hf runs one device)"
            )
        return
    if tp * dp > visible:
        raise ConfigError(
            f"tensor_parallel_size={tp} x data_parallel_size={dp} = {tp * dp} GPUs, but {visible} are "
            "visible (CUDA_VISIBLE_DEVICES): lower one, e.g. "
            f"data_parallel_size={max(1, visible // tp)}"
        )
    if dp > 1 and not has_ray:
        raise ConfigError(
            f"data_parallel_size={dp} needs ray (lm-eval runs each replica as a ray actor): "
            "pip install ray, or set data_parallel_size=1"
        )


def lm_args(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of lm-eval's HFLM (backend=hf) or VLLM (backend=vllm)."""
    dtype = resolve_dtype(cfg)
    if cfg.backend == "hf":
        return {
            "pretrained": cfg.model_path,
            "device": cfg.device,
            "batch_size": cfg.batch_size,
            "dtype": dtype,
            "max_length": cfg.max_model_len,
        }
    return {
        "pretrained": cfg.model_path,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "data_parallel_size": cfg.data_parallel_size,
        "dtype": dtype,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": cfg.max_model_len,
        "batch_size": "auto",
        "seed": cfg.seed,
    }


def reopen_generations(lm: Any) -> Any:
    """Make lm.generate_until put back the think block each request's prompt opened (R1 templates).

    lm-eval's requests carry the rendered prompt as args[0]; an output `o` becomes
    reopen_think(prompt, o), so graders see `<think>` and read only what follows `</think>`.
    """
    inner = lm.generate_until

    def generate_until(requests: list, disable_tqdm: bool = False) -> list[str]:
        outs = inner(requests, disable_tqdm=disable_tqdm)
        return [reopen_think(req.args[0], o) for req, o in zip(requests, outs)]

    lm.generate_until = generate_until
    return lm


def resolve_decoder(cfg: Any) -> str:
    """Who decodes: `vllm` on that backend; on hf, `slots` (greedy requests on the slot decoder,
    branchmerge/eval/slots.py) or `hf` (HF generate). `auto` picks slots on CPU, hf elsewhere."""
    decoder = cfg.get("decoder", "auto")
    if cfg.backend == "vllm":
        if decoder == "slots":
            raise ConfigError("decoder=slots runs on backend=hf only; use decoder=auto with backend=vllm")
        return "vllm"
    if decoder == "auto":
        return "slots" if str(cfg.device).startswith("cpu") else "hf"
    return decoder


def build_lm(cfg: Any):
    from importlib.util import find_spec

    if cfg.backend == "vllm":
        import torch

        check_gpus(cfg, torch.cuda.device_count(), find_spec("ray") is not None)
    else:
        check_gpus(cfg, 0, False)
    decoder = resolve_decoder(cfg)
    if decoder == "slots":
        from branchmerge.eval.slots_lm import SlotHFLM

        lm = SlotHFLM(**lm_args(cfg))
        if lm.slot_problems and cfg.get("decoder") == "slots":
            raise ConfigError(
                f"decoder=slots cannot run {cfg.model_path}: {'; '.join(lm.slot_problems)}; use decoder=hf"
            )
        lm.decoder = "hf" if lm.slot_problems else "slots"
    elif decoder == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(**lm_args(cfg))
        lm.decoder = "hf"
    else:
        from lm_eval.models.vllm_causallms import VLLM

        lm = VLLM(**lm_args(cfg))
        lm.decoder = "vllm"
    if cfg.get("generation_cache"):
        lm = _cached(lm, cfg)
    return reopen_generations(lm)


def _cached(lm: Any, cfg: Any) -> Any:
    """Greedy generations served from `generation_cache` when this model already made them."""

    settings = {
        **{k: cfg.get(k) for k in ("backend", "device", "max_model_len", "tensor_parallel_size")},
        "dtype": resolve_dtype(cfg),
        "decoder": lm.decoder,
        "max_length": getattr(lm, "max_length", None),
        "versions": {**versions(), **_lm_eval_version()},
    }
    key = model_key(Path(cfg.model_path), model_hash(Path(cfg.model_path)), settings)
    return cache_generations(lm, GenerationStore(cfg.generation_cache), key)


def _dataset_file(task: str, cfg: Any) -> Path | None:
    """The file the task's documents came from: for toy tasks the split the suite asked for."""
    from branchmerge.data.benchmarks import SOURCES, toy_file

    if task.startswith("toy_"):
        split = next(t.split for t in cfg.eval.tasks if t.name == task)
        return toy_file(cfg.toy_dir, task.removeprefix("toy_"), split)
    return Path(cfg.data_dir) / SOURCES[task][0] if task in SOURCES else None


def evaluate(cfg: DictConfig) -> dict:
    cfg = validate(cfg, EvalConfig)
    code = any(t.name in CODE_TASKS for t in cfg.eval.tasks)
    sandbox.configure(cfg.sandbox.isolation, cfg.sandbox.workers, verify_now=code)
    model_path = Path(cfg.model_path)
    if not (model_path / "config.json").exists():
        raise MissingFileError(f"model_path={model_path} is not a Hugging Face model folder (no config.json)")
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    tasks = {spec.name: build_task(spec, cfg) for spec in cfg.eval.tasks}  # a missing file fails here
    store = GenerationStore(cfg.generation_cache) if cfg.get("generation_cache") else None
    with reference_runs(tasks, cfg.eval.tasks, store) as refs:  # toy code: from now on, beside the rest
        lm = build_lm(cfg)
        results = _header(lm, cfg)
        with (run_dir / "samples.jsonl").open("w") as f:
            for spec in cfg.eval.tasks:
                results["tasks"][spec.name] = _run_one(lm, tasks[spec.name], spec, cfg, f)
    results["generation_cache"] = getattr(lm, "generation_cache", None)  # path, hits, misses
    if refs is not None and results["generation_cache"] is not None:
        results["generation_cache"]["reference_outputs_reused"] = refs.stored  # toy code: not run again
    results["seconds"] = round(time.time() - t0, 1)
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.info("results: %s", run_dir / "results.json")
    return results


def _header(lm: Any, cfg: Any) -> dict[str, Any]:
    """results.json's settings: model, backend, decoder, dtype, template, versions, sandbox."""
    model_path = Path(cfg.model_path)
    return {
        "model": {"path": str(model_path.resolve()), "hash": model_hash(model_path)},
        "suite": cfg.eval.name,
        "backend": cfg.backend,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "decoder": lm.decoder,
        "dtype": resolve_dtype(cfg),
        "dtype_setting": cfg.dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "data_parallel_size": cfg.data_parallel_size,
        "chat_template": getattr(lm.tokenizer, "chat_template", None),
        "versions": {**versions(), **_lm_eval_version()},
        "sandbox": sandbox.provenance(),  # how generated code ran; a `warning` when not isolated
        "tasks": {},
    }


def _run_one(lm: Any, task: Any, spec: Any, cfg: Any, samples) -> dict[str, Any]:
    """Run one task, append its rows to `samples` (with generated-token counts); its summary."""
    t1 = time.time()
    rows = run_task(lm, task, spec, cfg)
    generated = [r["response"][len(r["opened_by_prompt"]) :] for r in rows]
    ids = lm.tokenizer(generated, add_special_tokens=False)["input_ids"] if rows else []
    for r, toks in zip(rows, ids):
        r["n_tokens"] = len(toks)
        samples.write(json.dumps(r) + "\n")
    data_file = _dataset_file(spec.name, cfg)
    summary = summarize_task(rows, spec.max_gen_toks)
    summary.update(
        {
            "unclosed_think": sum(unclosed(r["response"]) for r in rows),
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
    log.info(
        "%s: pass@1 %.4f ± %.4f (n=%d, %d questions)",
        spec.name,
        summary["pass@1"],
        summary["stderr"],
        spec.n,
        summary["questions"],
    )
    return summary


def unclosed(response: str) -> bool:
    """A generation that opened a think block and never closed it (cut off by max_gen_toks)."""
    return response.rfind(THINK_CLOSE) < response.rfind(THINK_OPEN)


def _lm_eval_version() -> dict[str, str]:
    import importlib.metadata as md

    return {"lm_eval": md.version("lm_eval")}
