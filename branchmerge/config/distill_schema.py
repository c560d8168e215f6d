"""Schema of `distill.py` (conf/distill.yaml, conf/teacher/, the data experiments); see schema.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from branchmerge.config.schema import PathsConfig, SandboxConfig


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
    name: Literal["toy", "openai", "vllm", "hf"]
    model: str | None = None  # served model name (openai), HF folder or hub id (vllm, hf)
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the API key (openai)
    n: int = 1  # samples per question
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int | None = None
    n_per_request: bool = True  # false: n separate requests of n=1 (APIs without `n`, e.g. DeepSeek's)
    concurrency: int = 16  # openai: requests in flight
    timeout_s: float = 1800.0  # openai: per request
    max_retries: int = 8
    backoff_s: float = 2.0  # first retry waits ~backoff_s, doubling up to backoff_max_s
    backoff_max_s: float = 120.0
    on_error: Literal["raise", "skip"] = "raise"  # a request that failed every retry: stop, or count+skip
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into the openai request body
    tensor_parallel_size: int = 1  # vllm
    dtype: str = "auto"  # vllm
    batch_size: int = 256  # vllm: requests per journalled chunk
    corrupt: dict[str, float] = field(default_factory=dict)  # toy: {wrong_answer: p, unclosed_think: q}


@dataclass
class SourceConfig:
    format: Literal["openr1_math", "openthoughts_metadata", "openthoughts", "s1", "records"]
    path: str  # a local .jsonl, .json or .parquet file
    select: dict[str, list[Any]] = field(default_factory=dict)  # metadata key -> allowed values
    instruction: str | None = None  # appended to the question; null = the format's default
    limit: int | None = None  # read at most this many rows


@dataclass
class DomainConfig:
    sources: list[SourceConfig]
    generate: bool = False  # true: the sources are seed questions and the teacher writes the traces
    verifier: Literal["math", "letter", "code", "toy", "none"] = "none"
    on_unverifiable: Literal["keep", "drop"] = "drop"  # no reference / no tests to check against


@dataclass
class DecontamConfig:
    sets: list[str] = field(default_factory=lambda: ["aime24", "gpqa_diamond", "livecodebench", "toy"])
    eval_data_dir: str | None = None  # aime_2024.jsonl, gpqa_diamond.csv, livecodebench.jsonl
    toy_dir: str | None = None  # <toy_dir>/data/<domain>/test.jsonl
    ngram: int = 13
    threshold: float = 0.5  # share of an eval item's n-grams found in the prompt
    max_df: int = 10  # n-grams in more than this many eval items are template text, ignored
    missing: Literal["raise", "skip"] = "raise"


@dataclass
class SelectionConfig:
    format: bool = True
    max_tokens: int | None = 16384  # prompt + response, student's tokenizer; null = no limit
    template: Literal["chatml", "deepseek_r1"] = "chatml"  # the training chat template (conf/data/*.yaml)
    dedup: bool = True
    near_dup_threshold: float | None = 0.9  # estimated Jaccard of prompt shingles; null = off
    minhash_perm: int = 64
    minhash_bands: int = 16
    shingle: int = 5
    verify_workers: int = 4
    code_max_tests: int = 10
    decontam: DecontamConfig = field(default_factory=DecontamConfig)


@dataclass
class DistillConfig:
    task_name: str
    run_name: str
    seed: int
    paths: PathsConfig
    teacher: TeacherConfig
    toy: ToyWorldConfig | None = None
    output_dir: str = ""
    domains: dict[str, DomainConfig] = field(default_factory=dict)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    student_tokenizer: str | None = None  # HF folder or hub id; counts tokens for selection.max_tokens
    on_bad_row: Literal["skip", "raise"] = "skip"
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # how code verification runs programs
