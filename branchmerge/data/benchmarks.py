"""Evaluation sets from local files, as documents for the lm-eval tasks.

| task | file (under eval.data_dir) | source (for users with internet) |
|---|---|---|
| aime24 | aime_2024.jsonl | HuggingFaceH4/aime_2024 (train split, 30 rows: problem, answer, ...) |
| gpqa_diamond | gpqa_diamond.csv | Idavidrein/gpqa (gated; gpqa_diamond.csv, 198 rows) |
| livecodebench | livecodebench.jsonl | livecodebench/code_generation_lite (the release's test*.jsonl) |
| toy_* | <toy_dir>/data/<domain>/{test,val}.jsonl | `python distill.py +experiment=toy_data` |

Every loader returns {"test": datasets.Dataset} (lm-eval's name for the split it scores, whichever file
it came from) and fails with the expected path and its source when the file is missing. Only the toy
tasks have a second held-out set: `split="val"` reads val.jsonl (what sweeps select on), after checking
on disk that none of its prompts is in the same domain's test.jsonl; the real benchmarks refuse it.
"""

from __future__ import annotations

import base64
import csv
import json
import pickle
import random
import zlib
from datetime import date
from pathlib import Path

import datasets

from branchmerge.data.records import read_records
from branchmerge.errors import ConfigError, DataError, MissingFileError
from branchmerge.foundation import mix_seed

SOURCES = {
    "aime24": (
        "aime_2024.jsonl",
        "huggingface-cli download HuggingFaceH4/aime_2024 --repo-type dataset, "
        "then save its train split as JSONL",
    ),
    "gpqa_diamond": (
        "gpqa_diamond.csv",
        "the gpqa_diamond.csv file of Idavidrein/gpqa (accept its terms on the hub)",
    ),
    "livecodebench": (
        "livecodebench.jsonl",
        "the test*.jsonl files of livecodebench/code_generation_lite, concatenated",
    ),
}
MATH_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
GPQA_PROMPT = (
    "Answer the following multiple choice question. Think step by step, then put the letter of "
    "your final answer within \\boxed{}."
)
TOY_SPLITS = ("test", "val")
TOY_DATA_FIX = "python distill.py +experiment=toy_data toy.overwrite=true"
LCB_PROMPT = (
    "You will be given a question (problem specification) and will generate a correct Python program "
    "that matches the specification and passes all tests."
)


def _path(task: str, data_dir: str | None) -> Path:
    fname, source = SOURCES[task]
    path = Path(data_dir or "data/eval") / fname
    if not path.exists():
        raise MissingFileError(
            f"evaluation set for {task} not found at {path}: get it from {source} (or set eval.data_dir)"
        )
    return path


def only_test(task: str, split: str) -> None:
    """The real benchmarks are test sets only: asking one for another split is a config mistake."""
    if split != "test":
        raise ConfigError(f"task {task} has no {split} split (only the toy tasks have val); set split: test")


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path)).to_list()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_aime24(data_dir: str | None = None, split: str = "test", **_) -> dict:
    only_test("aime24", split)
    rows = read_rows(_path("aime24", data_dir))
    docs = [
        {"id": str(r.get("id", i)), "prompt": f"{r['problem']}\n{MATH_PROMPT}", "answer": str(r["answer"])}
        for i, r in enumerate(rows)
    ]
    return {"test": datasets.Dataset.from_list(docs)}


def load_gpqa_diamond(
    data_dir: str | None = None, n_samples: int = 4, seed: int = 0, split: str = "test", **_
) -> dict:
    """One document per (question, sample): sample k shows the options in the order of seed (seed, q, k)."""
    only_test("gpqa_diamond", split)
    rows = read_rows(_path("gpqa_diamond", data_dir))
    docs = []
    for q, r in enumerate(rows):
        options = [
            r["Correct Answer"],
            r["Incorrect Answer 1"],
            r["Incorrect Answer 2"],
            r["Incorrect Answer 3"],
        ]
        for k in range(n_samples):
            shuffle_seed = mix_seed(seed, q * 101 + k)
            order = list(range(4))
            random.Random(shuffle_seed).shuffle(order)
            letter = "ABCD"[order.index(0)]
            body = "\n".join(f"{'ABCD'[j]}) {options[o].strip()}" for j, o in enumerate(order))
            docs.append(
                {
                    "id": str(r.get("Record ID", q)),
                    "sample": k,
                    "shuffle_seed": shuffle_seed,
                    "prompt": f"{GPQA_PROMPT}\n\n{r['Question'].strip()}\n\n{body}",
                    "answer": letter,
                }
            )
    return {"test": datasets.Dataset.from_list(docs)}


def _private_tests(raw: str) -> list[dict]:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return json.loads(pickle.loads(zlib.decompress(base64.b64decode(raw.encode("utf-8")))))


def load_livecodebench(
    data_dir: str | None = None,
    start: str = "2024-08-01",
    end: str = "2025-02-01",
    split: str = "test",
    **_,
) -> dict:
    """code_generation_lite problems with start <= contest_date < end (the paper's window)."""
    only_test("livecodebench", split)
    lo, hi = date.fromisoformat(start), date.fromisoformat(end)
    docs = []
    for r in read_rows(_path("livecodebench", data_dir)):
        d = date.fromisoformat(str(r["contest_date"])[:10])
        if not lo <= d < hi:
            continue
        meta = json.loads(r.get("metadata") or "{}")
        tests = json.loads(r["public_test_cases"]) + _private_tests(r["private_test_cases"])
        starter = r.get("starter_code") or ""
        fmt = (
            f"You will use the following starter code to write the solution to the problem and enclose your "
            f"code within delimiters.\n```python\n{starter}\n```"
            if starter
            else "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
            "test on the sample inputs). Enclose your code within delimiters as follows.\n```python\n"
            "# YOUR CODE HERE\n```"
        )
        docs.append(
            {
                "id": r["question_id"],
                "prompt": f"{LCB_PROMPT}\n\nQuestion: {r['question_content']}\n\n{fmt}",
                "tests": json.dumps(tests),
                "func_name": meta.get("func_name") or "",
                "contest_date": str(r["contest_date"])[:10],
            }
        )
    if not docs:
        raise DataError(
            f"no LiveCodeBench problem dated {start} <= d < {end} in {_path('livecodebench', data_dir)}"
        )
    return {"test": datasets.Dataset.from_list(docs)}


def toy_file(toy_dir: str | Path | None, domain: str, split: str) -> Path:
    """<toy_dir>/data/<domain>/<split>.jsonl (toy_dir defaults to outputs/toy_world)."""
    if split not in TOY_SPLITS:
        raise ConfigError(f"toy split {split!r} is not one of {list(TOY_SPLITS)}")
    return Path(toy_dir or "outputs/toy_world") / "data" / domain / f"{split}.jsonl"


def check_val_disjoint(val: Path, test: Path, val_prompts: set[str]) -> None:
    """Refuse a val set that shares a prompt with test (a sweep would then select on test items)."""
    if not test.exists():
        raise MissingFileError(
            f"{test} not found, so {val} cannot be checked against it: run `{TOY_DATA_FIX}`"
        )
    shared = val_prompts & {r.prompt for r in read_records(test)}
    if shared:
        raise DataError(
            f"{val} shares {len(shared)} prompt(s) with {test} (val must be disjoint from test): "
            f"rebuild the toy world with `{TOY_DATA_FIX}`"
        )


def load_toy(
    domain: str, toy_dir: str | None = None, limit: int | None = None, split: str = "test", **_
) -> dict:
    """The first `limit` items of a toy domain's test or val set, as lm-eval documents."""
    path = toy_file(toy_dir, domain, split)
    if not path.exists():
        raise MissingFileError(f"toy {split} set {path} not found: run `{TOY_DATA_FIX}`")
    records = list(read_records(path))
    if split == "val":
        check_val_disjoint(path, toy_file(toy_dir, domain, "test"), {r.prompt for r in records})
    docs = [
        {
            "id": r.id,
            "prompt": r.prompt,
            "answer": r.reference,
            "domain": r.domain,
            "meta": json.dumps(r.metadata),
        }
        for r in records
    ][:limit]
    return {"test": datasets.Dataset.from_list(docs)}
