"""In-process teachers: `hf` (transformers generate, CPU-friendly), `vllm` (offline batch, GPU), `toy`.

- hf: one request at a time, `num_return_sequences=n`, sampling unless temperature == 0; journalled
  after each request. For tests and small models; `python -m branchmerge.distill.serve` serves the same
  generation over HTTP for the `openai` backend.
- vllm: prompts rendered with the teacher's own chat template, then `LLM.generate` over chunks of
  `batch_size` requests with one `SamplingParams(n, temperature, top_p, max_tokens, seed)` per request;
  journalled after each chunk (a restart redoes at most one chunk). Imported only when used, so CPU
  machines never need vllm.
- toy: the toy world's oracle. It knows every problem of the toy world (it wrote them) and answers
  with its trace; `corrupt` ({"wrong_answer": p, "unclosed_think": q}) damages a seeded share of the
  samples so the toy run shows the filters at work. Unknown prompts are an error.

hf and vllm render the prompt themselves, so they see when the template opened the think block
(R1-family: the prompt ends with `<｜Assistant｜><think>\\n`) and put that opening back in front of
every sample (`reopen_think`); otherwise no R1 sample would pass the format filter. Each request is
sampled with its own seed (`request_seed`), recorded with its samples.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from branchmerge.distill.teachers import GenRequest, GenResult, request_seed, with_seed
from branchmerge.errors import ConfigError, MissingFileError
from branchmerge.verify.extract import reopen_think

log = logging.getLogger(__name__)


def _render(tok, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class HFTeacher:
    def __init__(self, cfg: Any, model: Any = None, tok: Any = None):
        """`model`/`tok` given (tests): used as they are; else loaded from cfg.model in float32."""
        if not cfg.model and model is None:
            raise ConfigError("teacher=hf needs teacher.model (a local Hugging Face folder)")
        self.cfg = cfg
        if model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
        self.model, self.tok = model, tok
        self.name = Path(cfg.model or "model").name

    def sample(
        self, messages: list[dict[str, str]], n: int, seed: int | None = None
    ) -> tuple[list[dict[str, str]], dict[str, int]]:
        from branchmerge.distill.serve import generate_chat

        c = self.cfg
        return generate_chat(
            self.model, self.tok, messages, n, c.temperature, c.top_p, c.max_new_tokens, seed
        )

    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        for req in requests:
            seed = request_seed(self.cfg.seed, req.key)
            samples, usage = self.sample(req.messages, req.n, seed)
            on_done(GenResult(req.key, req.seed_id, with_seed(samples, seed), usage, self.name))
        return []


class VLLMTeacher:
    def __init__(self, cfg: Any, llm: Any = None, sampling_params: Any = None):
        """`llm`/`sampling_params` given (tests): a vllm.LLM-like engine and its SamplingParams class."""
        self.cfg = cfg
        if llm is None:
            try:
                from vllm import LLM, SamplingParams
            except ImportError as e:
                raise ImportError("teacher=vllm needs vllm (pip install -e '.[gpu]') and a GPU") from e
            llm = LLM(
                model=cfg.model,
                tensor_parallel_size=cfg.tensor_parallel_size,
                dtype=cfg.dtype,
                seed=cfg.seed or 0,
            )
            sampling_params = SamplingParams
        self.llm, self.params = llm, sampling_params
        self.tok = llm.get_tokenizer()
        self.name = str(cfg.model)

    def _params(self, req: GenRequest, seed: int | None) -> Any:
        c = self.cfg
        return self.params(
            n=req.n, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_new_tokens, seed=seed
        )

    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        step = max(1, self.cfg.batch_size)
        for i in range(0, len(requests), step):
            chunk = requests[i : i + step]
            texts = [_render(self.tok, r.messages) for r in chunk]
            # token ids, not text: the template already wrote BOS, so no second one is added
            prompts = [
                {"prompt_token_ids": self.tok(t, add_special_tokens=False)["input_ids"]} for t in texts
            ]
            seeds = [request_seed(self.cfg.seed, r.key) for r in chunk]
            params = [self._params(r, s) for r, s in zip(chunk, seeds)]
            outs = self.llm.generate(prompts, params, use_tqdm=True)
            for req, text, seed, out in zip(chunk, texts, seeds, outs):
                samples = [
                    {"text": reopen_think(text, o.text), "finish_reason": o.finish_reason or ""}
                    for o in out.outputs
                ]
                usage = {
                    "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": sum(len(o.token_ids) for o in out.outputs),
                }
                on_done(GenResult(req.key, req.seed_id, with_seed(samples, seed), usage, self.name))
        return []


class ToyTeacher:
    """The toy world's oracle: prompt -> its R1-style trace, read from the toy world's files."""

    def __init__(self, cfg: Any, toy_dir: str | None = None):
        from branchmerge.data.records import read_records

        files = sorted(Path(toy_dir or "").glob("data/*/*.jsonl"))
        if not files:
            raise MissingFileError(
                f"the toy teacher needs a toy world at {toy_dir}: run `python distill.py +experiment=toy_data`"
            )
        self.traces = {r.prompt: r.response for f in files for r in read_records(f) if r.response}
        self.corrupt = dict(cfg.corrupt or {})
        unknown = set(self.corrupt) - {"wrong_answer", "unclosed_think"}
        if unknown:
            raise ConfigError(
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
