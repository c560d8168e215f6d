"""Dataclass schemas of the primary configs (conf/*.yaml); `validate` checks a composed config.

One schema per config group, composed into one per entry point. A stage that grows a setting adds
the field here and in its YAML; tests compose every primary config and overlay against these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class PathsConfig:
    root_dir: str  # the project checkout (or BRANCHMERGE_ROOT)
    output_dir: str  # every output of every stage lives under here
    toy_dir: str  # the toy world: datasets, tokenizer, base student
    data_dir: str  # real datasets (local copies of hub datasets)
    model_dir: str  # real models (local copies of hub checkpoints)
    run_dir: str  # this run's folder (Hydra's output dir)
    toy_base: str = ""  # the shipped toy base student (an HF folder)
    toy_base_strong: str = ""  # the regime study's strong toy base (an HF folder)
    toy_world: str = "toy_data"  # the distill experiment that builds toy_dir when it is missing


@dataclass
class ModelConfig:
    name: str
    path: str | None = None  # HF folder or hub id; None = build `arch` from scratch (random init)
    tokenizer: str | None = None  # defaults to `path`
    arch: dict[str, Any] | None = None  # Qwen2Config keyword arguments for a from-scratch model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    init_seed: int = 0
    max_position_embeddings: int | None = None


@dataclass
class DataConfig:
    name: str
    train_files: list[str]
    template: Literal["chatml", "deepseek_r1"] = "chatml"
    add_template_tokens: bool = False  # add a missing end-of-turn token into the padded vocabulary rows
    max_length: int = 16384
    packing: bool = True
    cross_document_attention: bool = False  # False = packed documents never attend to each other
    overlong: Literal["truncate", "drop"] = "drop"
    on_bad_row: Literal["raise", "skip"] = "raise"
    num_proc: int = 1
    shuffle_seed: int = 42
    max_records: int | None = None  # take the first N records of each file (toy runs, smoke tests)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_ratio: float = 0.1
    schedule: Literal["constant_with_warmup", "cosine"] = "constant_with_warmup"
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    precision: str = "32-true"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 caps optimizer steps (overrides epochs)
    global_batch_size: int = 16  # sequences (packed rows) per optimizer step, over all ranks
    micro_batch_size: int = 1  # per device
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    keep_last_checkpoints: int = 2
    threads: int | None = None  # torch intra-op threads per process (None = torch's default)
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 4096  # label positions projected onto the vocabulary at once (0 = all)
    compile: bool = False
    progress_bar: bool = True


@dataclass
class StrategyConfig:
    name: Literal["single", "ddp", "fsdp2"]
    backend: str | None = None  # None = nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # refused (see train.run.make_strategy)
    timeout_s: int = 3600  # collective timeout: the longest any rank may wait for the others


@dataclass
class FisherConfig:
    enabled: bool = False
    last_n_steps: int = 10


@dataclass
class TrainConfig:
    task_name: str
    run_name: str
    seed: int
    paths: PathsConfig
    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig
    strategy: StrategyConfig
    optim: OptimConfig
    logger: dict[str, dict[str, Any]]
    fisher: FisherConfig = field(default_factory=FisherConfig)
    resume: Literal["auto", "never"] | str = "auto"
    export: bool = True


@dataclass
class MergeOptionsConfig:
    """How the merge engine runs (also its `MergeOptions`)."""

    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None = each tensor's input dtype
    # the dtype every method computes in (mergekit's `dtype`); inputs are cast block by block
    compute_dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    device: str = "cpu"
    copy_files_from: str | None = None  # a model name; default: the final step's base or first input
    max_shard_bytes: int = 5_000_000_000
    check_finite: bool = True
    # tensors of up to this many entries merge whole, one per thread; larger ones block-parallel
    chunk_elements: int = 1 << 24
    hash_inputs: bool = True
    progress: bool = True


@dataclass
class CalibrationConfig:
    """The calibration rows of a data-driven merge method (ACM's activation pass,
    branchmerge/merge/activations.py): records read from `files` in turn, through the chat template."""

    files: list[str] = field(default_factory=list)  # JSONL record files; [] = no activation pass
    rows: int = 64  # records used, taken in turn from each file
    max_tokens: int = 512  # tokens kept per record (the rest is cut)
    template: Literal["chatml", "deepseek_r1"] = "chatml"
    samples: int = 65536  # hidden-state entries sampled per layer (the same entries in every model)
    bins: int = 32  # equal-frequency bins per model in the mutual-information estimate
    seed: int = 0  # which entries are sampled
    device: str = "cpu"  # where each model runs its forward passes (one model at a time)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @staticmethod
    def problems(value: dict, key: str) -> list[str]:
        """Bounds the estimate needs: at least 2 bins and enough samples to fill the joint histogram."""
        out = [
            f"{key}.{k}: must be >= {lo}, got {value.get(k)}"
            for k, lo in (("rows", 1), ("max_tokens", 2), ("bins", 2))
            if isinstance(value.get(k), int) and value[k] < lo
        ]
        bins, samples = value.get("bins"), value.get("samples")
        if isinstance(bins, int) and isinstance(samples, int) and samples < 4 * bins * bins:
            out.append(
                f"{key}.samples: {samples} samples leave the {bins}x{bins} joint histogram "
                f"nearly empty; use >= {4 * bins * bins} (or fewer bins)"
            )
        return out


@dataclass
class WandbTrialConfig:
    enabled: bool = True  # one W&B run per scored merge (offline unless WANDB_MODE says otherwise)
    project: str = "branchmerge-sweeps"
    mode: Literal["offline", "online", "disabled"] = "offline"
    group: str | None = None  # default: the sweep's name


@dataclass
class SandboxConfig:
    """How generated programs run (branchmerge/verify/sandbox.py): LiveCodeBench, toy code, distillation."""

    isolation: Literal["bwrap", "process"] = "bwrap"  # process: weaker in-process guard, opt-in only
    workers: int | None = None  # programs run at once when grading code; None = the CPU count


@dataclass(kw_only=True)
class EvalRunnerConfig:
    """How a model is run for scoring: shared by evaluate.py (EvalConfig) and scored merges (ScoreConfig)."""

    backend: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    # auto: the checkpoint's own dtype (config.json) on GPU backends, float32 for hf on CPU
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    batch_size: int = 64
    max_model_len: int | None = None
    tensor_parallel_size: int = 1  # vLLM
    data_parallel_size: int = 1  # vLLM: model replicas, each on tensor_parallel_size GPUs (needs ray)
    gpu_memory_utilization: float = 0.9  # vLLM
    seed: int = 1234
    threads: int | None = None  # torch intra-op threads (None = torch's default)
    # hf backend: slots = greedy requests on the slot decoder (branchmerge/eval/slots.py), hf = HF
    # generate for all; auto = slots on CPU. Sampled requests always go to HF generate.
    decoder: Literal["auto", "slots", "hf"] = "auto"
    generation_cache: str | None = None  # folder of the persistent greedy-generation cache; None = off
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # how generated code is run


@dataclass
class ScoreConfig(EvalRunnerConfig):
    """How a merge scores its own output (when `eval` names a suite) and what a sweep trial returns."""

    metric: str = "mean"  # "mean" over the suite's tasks' pass@1, or one task's name (e.g. toy_math)
    # multi-objective sweeps: return these tasks' pass@1s, in order (one per hydra.sweeper.direction)
    objectives: list[str] = field(default_factory=list)
    direction: Literal["maximize", "minimize"] = "maximize"
    failure_value: float = -1.0  # what a failed trial returns inside a sweep (the sweep goes on)
    keep_weights: Literal["all", "best", "none"] = "all"  # best: delete every other trial's weights
    results_file: str | None = None  # trial rows (JSONL; a CSV beside it); default <sweep dir>/results.jsonl
    # after a Hydra sweep, the winner (best `metric` on the sweep's own suite, the val split) is also
    # scored on this suite (conf/eval/<name>.yaml, the test split); None = don't. See sweep/winner.py.
    test_eval: str | None = None
    sweep_name: str | None = None  # default: the sweep folder's name
    wandb: WandbTrialConfig = field(default_factory=WandbTrialConfig)


@dataclass
class MergeConfig:
    task_name: str
    run_name: str
    paths: PathsConfig
    output_dir: str
    options: MergeOptionsConfig
    overwrite: bool = False
    models: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    method: str | None = None
    base: str | None = None
    inputs: list[Any] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, float] | None = None  # LiNeS depth scaling of the step's task vector
    from_mergekit: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # ACM's activation pass
    eval: EvalSuiteConfig | None = None  # score the merged model on this suite (sweeps); None = don't
    score: ScoreConfig = field(default_factory=ScoreConfig)


TOY_TASKS = ("toy_math", "toy_code", "toy_science")  # the only tasks with a val split


@dataclass
class EvalTaskConfig:
    name: Literal["toy_math", "toy_code", "toy_science", "aime24", "gpqa_diamond", "livecodebench"]
    n: int = 1  # samples per question (pass@1 is averaged over them)
    temperature: float = 0.0
    top_p: float = 1.0
    max_gen_toks: int = 32768
    limit: int | None = None  # first N questions only
    # which held-out set: test (final numbers) or val (what sweeps select on; toy tasks only)
    split: Literal["test", "val"] = "test"

    @staticmethod
    def problems(value: dict, key: str) -> list[str]:
        """Rules across fields, run by `validate`: only the toy tasks have a val split."""
        if value.get("split") == "val" and value.get("name") not in TOY_TASKS:
            return [
                f"{key}.split: task {value.get('name')} has no val split (only {', '.join(TOY_TASKS)} "
                "do); set split: test"
            ]
        return []


@dataclass
class EvalSuiteConfig:
    name: str
    tasks: list[EvalTaskConfig]


@dataclass
class EvalConfig(EvalRunnerConfig):
    task_name: str
    run_name: str
    paths: PathsConfig
    eval: EvalSuiteConfig
    model_path: str
    data_dir: str = "data/eval"
    toy_dir: str = "outputs/toy_world"


# distill.py's schema lives in its own module (issue 6 grows it); re-exported here.
from branchmerge.config.distill_schema import (  # noqa: E402,F401
    DistillConfig,
    TeacherConfig,
    ToyWorldConfig,
)
