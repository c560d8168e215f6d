"""In-process teachers: `hf` (transformers generate, CPU-friendly), `vllm` (offline batch, GPU), `toy`.

- hf: one request at a time, `num_return_sequences=n`, sampling unless temperature == 0; journalled
  after each request. For tests and small models; `python -m branchmerge.distill.serve` serves the same
  generation over HTTP for the `openai` backend.
- vllm: `LLM.chat` over chunks of `batch_size` requests with `SamplingParams(n, temperature, top_p,
  max_tokens, seed)`; journalled after each chunk (a restart redoes at most one chunk). Imported only
  when used, so CPU machines never need vllm.
- toy: the toy world's oracle. It knows every problem of the toy world (it wrote them) and answers
  with its trace; `corrupt` ({"wrong_answer": p, "unclosed_think": q}) damages a seeded share of the
  samples so the toy run shows the filters at work. Unknown prompts are an error.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from branchmerge.distill.teachers import GenRequest, GenResult

log = logging.getLogger(__name__)


def _render(tok, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class HFTeacher:
    def __init__(self, cfg: Any):
        if not cfg.model:
            raise ValueError("teacher=hf needs teacher.model (a local Hugging Face folder)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
        self.name = Path(cfg.model).name

    def sample(self, messages: list[dict[str, str]], n: int) -> tuple[list[dict[str, str]], dict[str, int]]:
        from branchmerge.distill.serve import generate_chat

        return generate_chat(
            self.model,
            self.tok,
            messages,
            n,
            self.cfg.temperature,
            self.cfg.top_p,
            self.cfg.max_new_tokens,
            self.cfg.seed,
        )

    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        for req in requests:
            samples, usage = self.sample(req.messages, req.n)
            on_done(GenResult(req.key, req.seed_id, samples, usage, self.name))
        return []


class VLLMTeacher:
    def __init__(self, cfg: Any):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ImportError("teacher=vllm needs vllm (pip install -e '.[gpu]') and a GPU") from e
        self.cfg = cfg
        self.llm = LLM(
            model=cfg.model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            seed=cfg.seed or 0,
        )
        self.params = SamplingParams
        self.name = str(cfg.model)

    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        step = max(1, self.cfg.batch_size)
        for i in range(0, len(requests), step):
            chunk = requests[i : i + step]
            params = self.params(
                n=chunk[0].n,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                seed=self.cfg.seed,
            )
            outs = self.llm.chat([r.messages for r in chunk], params, use_tqdm=True)
            for req, out in zip(chunk, outs):
                samples = [{"text": o.text, "finish_reason": o.finish_reason or ""} for o in out.outputs]
                usage = {
                    "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": sum(len(o.token_ids) for o in out.outputs),
                }
                on_done(GenResult(req.key, req.seed_id, samples, usage, self.name))
        return []


class ToyTeacher:
    """The toy world's oracle: prompt -> its R1-style trace, read from the toy world's files."""

    def __init__(self, cfg: Any, toy_dir: str | None = None):
        from branchmerge.data.records import read_records

        files = sorted(Path(toy_dir or "").glob("data/*/*.jsonl"))
        if not files:
            raise FileNotFoundError(
                f"the toy teacher needs a toy world at {toy_dir}: run `python distill.py +experiment=toy_data`"
            )
        self.traces = {r.prompt: r.response for f in files for r in read_records(f) if r.response}
        self.corrupt = dict(cfg.corrupt or {})
        unknown = set(self.corrupt) - {"wrong_answer", "unclosed_think"}
        if unknown:
            raise ValueError(
                f"teacher.corrupt: unknown keys {sorted(unknown)}; known: wrong_answer, unclosed_think"
            )
        self.seed = cfg.seed or 0

    def damage(self, text: str, rng: random.Random) -> str:
        x = rng.random()
        wrong, unclosed = self.corrupt.get("wrong_answer", 0.0), self.corrupt.get("unclosed_think", 0.0)
        if x < wrong:  # the final answer changed: digits bumped, a letter moved on, a line added
            head, _, tail = text.rpartition("</think>")
            tail = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), tail, count=1)
            tail = re.sub(
                r"\\boxed\{([A-D])\}", lambda m: "\\boxed{" + "BCDA"["ABCD".index(m.group(1))] + "}", tail
            )
            changed = tail != text.rpartition("</think>")[2]
            return f"{head}</think>{tail}" if changed else text + "\n```\nwrong\n```"
        if x < wrong + unclosed:
            return text.split("</think>")[0]
        return text

    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        for req in requests:
            prompt = next(m["content"] for m in reversed(req.messages) if m["role"] == "user")
            if prompt not in self.traces:
                raise KeyError(f"the toy oracle does not know the prompt of {req.seed_id!r}")
            rng = random.Random(f"{self.seed}/{req.key}")
            samples = [
                {"text": self.damage(self.traces[prompt], rng), "finish_reason": "stop"} for _ in range(req.n)
            ]
            on_done(GenResult(req.key, req.seed_id, samples, {}, "toy-oracle"))
        return []
