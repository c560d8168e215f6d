"""Memory and time plan of a training run, before it starts: does it fit, how long will it take.

    python -m branchmerge.train.plan +experiment=math_branch trainer.num_nodes=4 trainer.devices=8
    python -m branchmerge.train.plan --paper                       # math, code, science, mixture
    python -m branchmerge.train.plan +experiment=code_branch +plan.mfu=0.4 +plan.gpu=H200

    plan = estimate(cfg)        # cfg: the validated TrainConfig; plan.fits, plan.render(), plan.memory
    check(cfg)                  # logs the rendering; ValueError (naming what to change) if it cannot fit

`plan.*` keys (all optional, on the command line only): records, mean_tokens (tokens per trace after the
template), packing_efficiency, length_cv (std/mean of trace lengths), mfu (default 0.35), gpu (default
H100-SXM; see GPUS), gpu_memory_gib, cuda_context_gib (default 2), fragmentation (default 0.10).
The memory model (components, phases, equations) is in branchmerge.train.memory_model; FLOPs in branchmerge.train.flops.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from branchmerge.errors import ConfigError
from branchmerge.train.flops import ModelShape, peak_bf16_flops, shape_from_config
from branchmerge.train.memory_model import GiB, MemoryInputs, MemoryPlan, memory

log = logging.getLogger(__name__)

# Shapes of the hub models the project's configs name (their config.json), so that a plan needs no download.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": ModelShape(5120, 27648, 64, 40, 8, 152064, tied=False),
    "Qwen/Qwen2.5-32B": ModelShape(5120, 27648, 64, 40, 8, 152064, tied=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ModelShape(1536, 8960, 28, 12, 2, 151936, tied=False),
}

# name -> (device name as CUDA reports it, for the peak; usable memory in GiB as CUDA reports it)
GPUS: dict[str, tuple[str, float]] = {
    "H100-SXM": ("NVIDIA H100 80GB HBM3", 79.1),
    "H100-PCIe": ("NVIDIA H100 PCIe", 79.1),
    "H100-NVL": ("NVIDIA H100 NVL", 93.1),
    "H800": ("NVIDIA H800", 79.1),
    "H200": ("NVIDIA H200", 139.8),
    "H20": ("NVIDIA H20", 95.0),
    "A100-80GB": ("NVIDIA A100-SXM4-80GB", 79.1),
    "A100-40GB": ("NVIDIA A100-SXM4-40GB", 39.4),
    "A800-80GB": ("NVIDIA A800-SXM4-80GB", 79.1),
    "L40S": ("NVIDIA L40S", 44.4),
    "B200": ("NVIDIA B200", 178.4),
}

# The paper's data sets: records (its counts) and mean tokens per trace with the chat template. The mean
# lengths are our assumption (R1 traces of a 16k-token budget; code traces are the longest): override
# with +plan.mean_tokens, or train once and the plan reads <run dir>/data_stats.json.
PAPER_DATA: dict[str, tuple[int, int]] = {
    "r1_math": (58_000, 5_000),
    "r1_code": (20_000, 8_000),
    "r1_science": (8_600, 6_000),
}
PAPER_DATA["r1_mixture"] = (
    sum(r for r, _ in PAPER_DATA.values()),
    round(sum(r * t for r, t in PAPER_DATA.values()) / sum(r for r, _ in PAPER_DATA.values())),
)
PAPER_EXPERIMENTS = ("math_branch", "code_branch", "science_branch", "mixture")
PLAN_KEYS = {
    "records", "mean_tokens", "packing_efficiency", "length_cv", "mfu", "gpu", "gpu_memory_gib",
    "cuda_context_gib", "fragmentation",
}  # fmt: skip


@dataclass(frozen=True)
class DataPlan:
    records: int
    mean_tokens: float
    packing_efficiency: float
    source: str  # where the numbers came from


@dataclass(frozen=True)
class TimePlan:
    steps: int
    tokens_per_step: float
    flops_per_step: float
    step_seconds: float
    gpu_hours: float
    mfu: float
    peak_flops: float


@dataclass
class Plan:
    name: str
    shape: ModelShape
    world: int
    gpu: str
    memory: MemoryPlan
    data: DataPlan | None
    time: TimePlan | None
    fix: str | None = None  # what to change when it does not fit
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def render(self) -> str:
        m = self.memory
        lines = [
            f"plan: {self.name}  ({self.shape.n_params() / 1e9:.2f} B params, {self.world} ranks, {self.gpu})",
            f"{'memory per GPU':<50}{'GiB':>9}",
        ]
        lines += [f"  {k:<48}{v / GiB:>9.2f}" for k, v in m.components.items()]
        lines += [f"  peak in phase '{k}'".ljust(50) + f"{v / GiB:>9.2f}" for k, v in m.phases.items()]
        lines += [
            f"  {'+ allocator fragmentation margin':<48}{m.fragmentation_bytes / GiB:>9.2f}",
            f"  {'+ CUDA context, NCCL and cuBLAS workspaces':<48}{m.context_bytes / GiB:>9.2f}",
            f"{'total vs card':<50}{m.total_bytes / GiB:>9.2f} of {m.card_bytes / GiB:.1f}"
            + ("  fits" if m.fits else "  DOES NOT FIT"),
        ]
        if self.data is not None:
            d = self.data
            lines.append(
                f"data: {d.records} records x {d.mean_tokens:.0f} tokens, packing efficiency "
                f"{d.packing_efficiency:.2f} ({d.source})"
            )
        if self.time is not None:
            t = self.time
            lines += [
                f"time: {t.steps} steps x {t.step_seconds:.1f} s ({t.tokens_per_step / 1e6:.2f} M tokens, "
                f"{t.flops_per_step / 1e15:.1f} PFLOP per step, MFU {t.mfu:.2f} of {t.peak_flops / 1e12:.0f} "
                f"TFLOP/s) = {t.steps * t.step_seconds / 3600:.1f} h wall, {t.gpu_hours:.0f} GPU-hours"
            ]
        lines += [f"note: {n}" for n in self.notes]
        if self.fix:
            lines.append(f"does not fit: {self.fix}")
        return "\n".join(lines)


# ---- model shape --------------------------------------------------------------------------------
def model_shape(model_cfg: Any) -> ModelShape:
    """From `model.arch` (from scratch), a local folder's config.json, or KNOWN_SHAPES for hub ids."""
    from transformers import AutoConfig

    path = model_cfg.path
    if path is None:
        if model_cfg.arch is None:
            raise ConfigError(f"model '{model_cfg.name}' needs `path` or `arch` for a plan")
        arch = dict(model_cfg.arch)
        model_type = arch.pop("model_type", "qwen2")
        if "vocab_size" not in arch:
            arch["vocab_size"] = _vocab_from_tokenizer(model_cfg)
        return shape_from_config(AutoConfig.for_model(model_type, **arch))
    folder = Path(str(path)).expanduser()
    if (folder / "config.json").is_file():
        return shape_from_config(AutoConfig.from_pretrained(str(folder)))
    if str(path) in KNOWN_SHAPES:
        return KNOWN_SHAPES[str(path)]
    raise ConfigError(
        f"model.path={path}: no config.json there and not a hub id the plan knows "
        f"({', '.join(KNOWN_SHAPES)}); point model.path at a local folder with the model's config.json"
    )


def _vocab_from_tokenizer(model_cfg: Any) -> int:
    from branchmerge.models import padded_vocab_size

    tok = model_cfg.tokenizer
    if tok is None or not Path(str(tok)).expanduser().exists():
        raise ConfigError(
            f"model '{model_cfg.name}': `arch` has no vocab_size and tokenizer {tok} is not a local folder; "
            "add model.arch.vocab_size or build the tokenizer first"
        )
    from transformers import AutoTokenizer

    return padded_vocab_size(len(AutoTokenizer.from_pretrained(str(tok))))


# ---- data ---------------------------------------------------------------------------------------
def data_plan(cfg: Any, opts: dict) -> DataPlan | None:
    """records / mean tokens: +plan overrides > <run dir>/data_stats.json > the files > PAPER_DATA."""
    eff = opts.get("packing_efficiency")
    records, mean, source = None, None, []
    stats_file = Path(str(cfg.paths.run_dir)) / "data_stats.json"
    if stats_file.is_file():
        s = json.loads(stats_file.read_text())
        records = s["records"] - s.get("dropped", 0)
        mean = s["tokens"] / max(1, records)
        eff = eff or s.get("packing_efficiency")
        source.append(f"measured: {stats_file}")
    elif cfg.data.train_files and all(Path(f).is_file() for f in cfg.data.train_files):
        records = sum(_count_records(Path(f)) for f in cfg.data.train_files)
        source.append("records counted in data.train_files")
    default = PAPER_DATA.get(cfg.data.name)
    if records is None and default is not None:
        records = default[0]
        source.append(f"records: the paper's count for {cfg.data.name}")
    if mean is None and default is not None:
        mean = default[1]
        source.append("mean tokens: assumed (override with +plan.mean_tokens)")
    if "records" in opts or "mean_tokens" in opts:
        source.append("+plan overrides")
    records = opts.get("records", records)
    mean = opts.get("mean_tokens", mean)
    if records is None or mean is None:
        return None
    if cfg.data.max_records is not None:
        records = min(records, cfg.data.max_records * len(cfg.data.train_files))
    return DataPlan(int(records), float(mean), float(eff or 0.95), "; ".join(source))


def _count_records(path: Path) -> int:
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".json":
        return len(json.loads(path.read_text()))
    raise ConfigError(f"{path}: cannot count records of a {path.suffix} file; pass +plan.records=N")


# ---- time ---------------------------------------------------------------------------------------
def time_plan(cfg: Any, shape: ModelShape, data: DataPlan, world: int, peak: float, mfu: float, cv: float):
    """steps = epochs x floor(rows / global batch); a step's FLOPs from flops.py over its real tokens:
    6 N_matmul T + 6 n_layers d_attn Σ L^2, with Σ L^2 over documents (E[L^2] = m^2 (1 + cv^2)) or over
    whole rows for plain packing (cross-document attention); seconds = FLOPs / (world * peak * MFU)."""
    t, d = cfg.trainer, cfg.data
    tokens_epoch = data.records * data.mean_tokens
    rows = math.ceil(tokens_epoch / (d.max_length * data.packing_efficiency)) if d.packing else data.records
    steps_epoch = max(1, rows // t.global_batch_size)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_epoch)
    tokens_step = tokens_epoch / rows * t.global_batch_size
    if d.packing and d.cross_document_attention:
        sum_sq = t.global_batch_size * (tokens_step / t.global_batch_size) ** 2
    else:
        sum_sq = tokens_step * data.mean_tokens * (1 + cv**2)
    flops = 6.0 * shape.matmul_params() * tokens_step + 6.0 * shape.layers * shape.d_attn * sum_sq
    step_s = flops / (world * peak * mfu)
    return TimePlan(steps, tokens_step, flops, step_s, steps * step_s * world / 3600, mfu, peak)


# ---- the plan -----------------------------------------------------------------------------------
def world_size(cfg: Any) -> int:
    devices = cfg.trainer.devices
    if not str(devices).isdigit():
        raise ConfigError(f"trainer.devices={devices}: a plan needs an integer number of devices per node")
    return int(devices) * cfg.trainer.num_nodes


def memory_inputs(cfg: Any, shape: ModelShape, opts: dict) -> MemoryInputs:
    t = cfg.trainer
    gpu = opts.get("gpu", "H100-SXM")
    if gpu not in GPUS:
        raise ConfigError(f"+plan.gpu={gpu} is unknown; pick one of {sorted(GPUS)}")
    fsdp = cfg.strategy.name == "fsdp2"
    bf16 = str(t.precision).startswith(("bf16", "16"))
    return MemoryInputs(
        shape=shape,
        shards=world_size(cfg) if fsdp else 1,
        fsdp=fsdp,
        ddp=cfg.strategy.name == "ddp",
        compute_bytes=2 if bf16 else 4,
        master_bytes=4 if fsdp else {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype],
        tokens=t.micro_batch_size * cfg.data.max_length,
        gradient_checkpointing=bool(t.gradient_checkpointing),
        loss_chunk_tokens=int(getattr(t, "loss_chunk_tokens", 4096) or 0),
        card_bytes=float(opts.get("gpu_memory_gib", GPUS[gpu][1])) * GiB,
        context_bytes=float(opts.get("cuda_context_gib", 2.0)) * GiB,
        fragmentation=float(opts.get("fragmentation", 0.10)),
        on_gpu=t.accelerator in ("gpu", "cuda", "auto"),
    )


def estimate(cfg: Any, opts: dict | None = None) -> Plan:
    """The plan of a validated TrainConfig; `opts` = the `plan.*` options (see the module docstring)."""
    opts = dict(opts or {})
    unknown = set(opts) - PLAN_KEYS
    if unknown:
        raise ConfigError(f"unknown plan option(s) {sorted(unknown)}; known: {sorted(PLAN_KEYS)}")
    shape = model_shape(cfg.model)
    world = world_size(cfg)
    inputs = memory_inputs(cfg, shape, opts)
    mem = memory(inputs)
    gpu = opts.get("gpu", "H100-SXM")
    plan = Plan(str(cfg.run_name), shape, world, gpu, mem, data_plan(cfg, opts), None)
    peak = peak_bf16_flops(GPUS[gpu][0])
    if plan.data is None:
        plan.notes.append(
            f"no time estimate: records / mean tokens of data '{cfg.data.name}' unknown "
            "(pass +plan.records=N +plan.mean_tokens=T)"
        )
    elif peak is not None:
        mfu = float(opts.get("mfu", 0.35))
        plan.time = time_plan(cfg, shape, plan.data, world, peak, mfu, float(opts.get("length_cv", 0.5)))
    if not inputs.on_gpu:
        plan.notes.append("CPU run: the card-memory check does not apply")
    elif not mem.fits:
        plan.fix = what_to_change(cfg, inputs)
    return plan


def what_to_change(cfg: Any, inputs: MemoryInputs) -> str:
    """One line naming the first setting whose change makes the plan fit."""
    if not inputs.gradient_checkpointing and memory(replace(inputs, gradient_checkpointing=True)).fits:
        return "enable gradient checkpointing (trainer.gradient_checkpointing=true)"
    for chunk in (4096, 2048, 1024, 512):
        smaller = 0 < chunk < (inputs.loss_chunk_tokens or inputs.tokens)
        if smaller and memory(replace(inputs, loss_chunk_tokens=chunk)).fits:
            return (
                f"lower trainer.loss_chunk_tokens to {chunk} (now {inputs.loss_chunk_tokens or 'whole row'})"
            )
    if inputs.fsdp:
        devices = int(cfg.trainer.devices)
        for nodes in range(cfg.trainer.num_nodes + 1, 129):
            if memory(replace(inputs, shards=devices * nodes)).fits:
                return f"raise trainer.num_nodes to {nodes} ({devices * nodes} GPUs; now {cfg.trainer.num_nodes})"
    else:
        return "shard the model: strategy=fsdp2"
    return f"lower data.max_length (now {cfg.data.max_length}) or use GPUs with more memory (+plan.gpu)"


def check(cfg: Any, opts: dict | None = None) -> Plan:
    """Log the plan; raise ValueError with what to change when it cannot fit on the GPUs."""
    plan = estimate(cfg, opts)
    log.info("%s", plan.render())
    if plan.fix is not None:
        raise ConfigError(
            f"the run does not fit in GPU memory ({plan.memory.total_bytes / GiB:.1f} of "
            f"{plan.memory.card_bytes / GiB:.1f} GiB per GPU): {plan.fix}"
        )
    return plan


# ---- command line -------------------------------------------------------------------------------
def compose_train(overrides: list[str]) -> tuple[Any, dict]:
    """conf/train.yaml with `overrides` as `python train.py` would compose it; (validated cfg, plan opts)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    import branchmerge.config.resolvers  # noqa: F401
    from branchmerge.config import validate
    from branchmerge.config.schema import TrainConfig

    conf = Path(__file__).resolve().parents[2] / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg.hydra):
            cfg.hydra.runtime.output_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            opts = OmegaConf.to_container(cfg.pop("plan", OmegaConf.create({})), resolve=True)
            del cfg["hydra"]
        return validate(cfg, TrainConfig), opts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m branchmerge.train.plan", description=__doc__.split("\n")[0])
    p.add_argument(
        "--paper", action="store_true", help="plan the paper's four runs (math, code, science, mixture)"
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = p.parse_args(argv)
    runs = (
        [[f"+experiment={e}", *args.overrides] for e in PAPER_EXPERIMENTS] if args.paper else [args.overrides]
    )
    plans = [estimate(*compose_train(o)) for o in runs]
    for plan in plans:
        print(plan.render(), end="\n\n")
    if args.paper:
        print(paper_summary(plans))
    bad = [pl for pl in plans if pl.fix is not None]
    for pl in bad:
        print(f"{pl.name} does not fit: {pl.fix}", file=sys.stderr)
    return 1 if bad else 0


def paper_summary(plans: list[Plan]) -> str:
    rows = [f"{'run':<16}{'GiB/GPU':>9}{'steps':>8}{'GPU-h':>9}"]
    for pl in plans:
        t = pl.time
        rows.append(
            f"{pl.name:<16}{pl.memory.total_bytes / GiB:>9.1f}{t.steps if t else 0:>8}"
            f"{t.gpu_hours if t else float('nan'):>9.0f}"
        )
    branches = sum(pl.time.gpu_hours for pl in plans if pl.time and pl.name != "mixture")
    rows.append(f"{'branches total':<33}{branches:>9.0f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
