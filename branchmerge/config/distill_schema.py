"""Schema of `distill.py` (conf/distill.yaml, conf/teacher/, the data experiments); see schema.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from branchmerge.config.schema import PathsConfig


@dataclass
class ToyWorldConfig:
    seed: int
    splits: dict[str, int]  # split name -> items per domain; "test" is the held-out set
    domains: dict[str, dict[str, Any]]  # domain -> difficulty knobs (see branchmerge/toy/domain_*.py)
    vocab_size: int = 1024
    verify_sample: int | None = 500  # teacher traces per non-test split re-checked by the verifier
    overwrite: bool = False


@dataclass
class TeacherConfig:
    name: Literal["toy"]  # issue 6 adds openai, vllm, hf
    model: str | None = None
    base_url: str | None = None
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768


@dataclass
class DistillConfig:
    task_name: str
    run_name: str
    seed: int
    paths: PathsConfig
    teacher: TeacherConfig
    toy: ToyWorldConfig | None = None
    output_dir: str = ""
