"""Distilling from R1-family teachers, whose chat template ends the prompt inside an opened think block
(`<｜Assistant｜><think>\\n`): the hf and vllm backends put the opening back, and every request is
sampled with its own seed. The R1 tokenizer is built locally (tests/r1_chat.py)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from branchmerge.config import validate
from branchmerge.config.schema import TeacherConfig
from branchmerge.data.records import Record
from branchmerge.distill.domain import requests_for
from branchmerge.distill.filters import check_format
from branchmerge.distill.serve import generate_chat
from branchmerge.distill.teachers import request_seed
from branchmerge.distill.teachers.local import HFTeacher, VLLMTeacher
from tests.r1_chat import BOS, GENERATION_PROMPT, pico_r1, r1_tokenizer

REPLY = "Two and two.\n</think>\n\nThe sum is \\boxed{4}."
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def tok():
    return r1_tokenizer()


def _cfg(**kw):
    base = {"name": "hf", "model": "pico", "n": 2, "seed": 3, "max_new_tokens": 8, "n_per_request": False}
    return validate({**base, **kw}, TeacherConfig)


def _as_record(text: str, finish_reason: str = "stop") -> Record:
    msgs = [*QUESTION, {"role": "assistant", "content": text}]
    return Record("q-s0", "math", "s", msgs, "4", {"finish_reason": finish_reason})


def test_the_r1_template_opens_the_think_block(tok):
    """The fixture is faithful where it matters: BOS first, history reasoning dropped, `<think>\\n` last."""
    history = [*QUESTION, {"role": "assistant", "content": "<think>\nsecret</think>\n\n4"}, *QUESTION]
    text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert text.startswith(BOS) and text.endswith(GENERATION_PROMPT) and "secret" not in text
    assert text.count("<｜User｜>") == 2 and text.count("<｜end▁of▁sentence｜>") == 1


class ScriptedModel:
    """Stands in for a causal LM: generate() appends the same continuation ids to every row."""

    def __init__(self, continuation: list[int]):
        self.continuation = continuation

    def generate(self, input_ids, attention_mask=None, num_return_sequences=1, **_):
        rows = input_ids.repeat(num_return_sequences, 1)
        tail = torch.tensor([self.continuation] * rows.shape[0])
        return torch.cat([rows, tail], dim=1)


def test_hf_generation_after_an_r1_prompt_passes_the_format_filter(tok):
    """Bug planted: generate_chat returning the decoded text as is (no reopen_think) -> the sample has
    `</think>` but no `<think>`, check_format says "no <think>" and distillation keeps nothing."""
    ids = tok(REPLY, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    samples, usage = generate_chat(ScriptedModel(ids), tok, QUESTION, 2, 0.6, 0.95, 64, seed=1)
    assert [s["text"] for s in samples] == ["<think>\n" + REPLY] * 2
    assert [s["finish_reason"] for s in samples] == ["stop", "stop"]
    assert check_format(_as_record(samples[0]["text"])) is None
    assert check_format(_as_record(REPLY)) == "no <think>"  # what the teacher returned before the fix
    assert usage["completion_tokens"] == 2 * (len(ids) - 1)


@dataclass
class FakeSamplingParams:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None


class FakeLLM:
    """vllm.LLM's surface the teacher uses: get_tokenizer() and generate(prompts, params, use_tqdm)."""

    def __init__(self, tok, reply: str):
        self.tok, self.reply, self.calls = tok, reply, []

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        out = SimpleNamespace(text=self.reply, finish_reason="stop", token_ids=[1, 2, 3])
        return [
            SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[out] * sp.n)
            for p, sp in zip(prompts, params)
        ]


def test_vllm_teacher_renders_reopens_and_seeds_every_request(tok):
    """Bugs planted, one at a time: (1) samples stored as vLLM returned them -> "no <think>";
    (2) one SamplingParams(seed=teacher.seed) for every request -> the two single-sample requests of a
    question carry the same seed and come back identical."""
    cfg = _cfg(name="vllm", model="teacher", batch_size=8)
    seeds = [Record(q, "math", "s", QUESTION, "4") for q in ("qa", "qb")]
    reqs = requests_for(seeds, cfg)
    llm = FakeLLM(tok, REPLY)
    done = []
    VLLMTeacher(cfg, llm=llm, sampling_params=FakeSamplingParams).run(reqs, done.append)
    prompts, params = llm.calls[0]
    rendered = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = prompts[0]["prompt_token_ids"]
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"] and ids.count(tok.bos_token_id) == 1
    want = [request_seed(3, k) for k in ("qa#0", "qa#1", "qb#0", "qb#1")]
    assert [p.seed for p in params] == want and len(set(want)) == 4
    assert [(p.n, p.temperature, p.top_p, p.max_tokens) for p in params] == [(1, 0.6, 0.95, 8)] * 4
    assert [r.key for r in done] == ["qa#0", "qa#1", "qb#0", "qb#1"]
    assert [r.samples[0]["seed"] for r in done] == want  # recorded with the sample, in the journal
    assert all(check_format(_as_record(r.samples[0]["text"])) is None for r in done)


def test_hf_teacher_samples_of_a_question_differ_and_repeat_across_runs(tmp_path):
    """With n_per_request=false each sample is its own request. Bug planted: every request sampled
    with teacher.seed (as before) -> both samples of a question are the same text."""
    model, tok = pico_r1(tmp_path / "pico")
    cfg = _cfg(temperature=1.0, top_p=1.0)
    reqs = requests_for([Record("q", "math", "s", QUESTION, "4")], cfg)

    def texts() -> list[tuple[str, int]]:
        done = []
        HFTeacher(cfg, model=model, tok=tok).run(reqs, done.append)
        return [(r.samples[0]["text"], r.samples[0]["seed"]) for r in done]

    first = texts()
    assert len({t for t, _ in first}) == 2 and len({s for _, s in first}) == 2
    assert all(t.startswith("<think>\n") for t, _ in first)  # the R1 prompt's opening is kept
    assert texts() == first  # same seeds, same samples: a resumed job re-sends identical requests
