"""The `openai` teacher's protocol handling, against httpx's mock transport (no sockets)."""

from __future__ import annotations

import json

import httpx
import pytest

from branchmerge.config import validate
from branchmerge.config.schema import TeacherConfig
from branchmerge.distill.teachers import GenRequest, request_seed
from branchmerge.distill.teachers.openai_api import OpenAITeacher, parse_choices


def _cfg(**kw):
    base = {
        "name": "openai",
        "model": "m",
        "base_url": "http://teacher/v1",
        "max_retries": 4,
        "backoff_s": 0.001,
        "backoff_max_s": 0.01,
        "n": 2,
        "seed": 7,
        "extra_body": {"stop": ["<eos>"]},
    }
    return validate({**base, **kw}, TeacherConfig)


def _ok(body: dict) -> httpx.Response:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"<think>x</think>{i}"},
            "finish_reason": "stop",
        }
        for i in range(body["n"])
    ]
    return httpx.Response(
        200, json={"choices": choices[::-1], "usage": {"completion_tokens": 3}, "model": "m"}
    )


def test_retries_transient_errors_then_succeeds_with_the_configured_body():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.headers["x-request-id"], body))
        if len(seen) == 1:
            raise httpx.ConnectError("refused")
        if len(seen) == 2:
            raise httpx.ReadTimeout("no answer within timeout_s")
        if len(seen) == 3:
            return httpx.Response(503, text="busy")
        if len(seen) == 4:
            return httpx.Response(429, headers={"Retry-After": "0.001"}, text="slow down")
        return _ok(body)

    done = []
    failed = OpenAITeacher(_cfg(), httpx.MockTransport(handler)).run(
        [GenRequest("q1", "q1", [{"role": "user", "content": "hi"}], 2)], done.append
    )
    assert failed == [] and len(seen) == 5 and {k for k, _ in seen} == {"q1"}
    body = seen[-1][1]
    assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (2, 0.6, 0.95, 32768)
    assert body["seed"] == request_seed(7, "q1") and body["stop"] == ["<eos>"] and body["model"] == "m"
    assert [s["text"] for s in done[0].samples] == ["<think>x</think>0", "<think>x</think>1"]  # by index
    assert [s["seed"] for s in done[0].samples] == [body["seed"]] * 2  # journalled with the samples
    assert done[0].usage == {"completion_tokens": 3}


def test_client_errors_are_not_retried_and_retries_are_bounded():
    calls = {"bad": 0, "down": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        key = request.headers["x-request-id"]
        calls[key] += 1
        return httpx.Response(400 if key == "bad" else 500, text="no")

    reqs = [GenRequest(k, k, [{"role": "user", "content": k}], 1) for k in ("bad", "down")]
    failed = OpenAITeacher(_cfg(n=1), httpx.MockTransport(handler)).run(reqs, lambda r: None)
    assert sorted(failed) == ["bad", "down"] and calls == {"bad": 1, "down": 5}


def test_reasoning_content_is_joined_into_a_think_block():
    body = {
        "choices": [
            {
                "index": 0,
                "message": {"content": "42", "reasoning_content": "because"},
                "finish_reason": "stop",
            }
        ]
    }
    assert parse_choices(body, 1) == [{"text": "<think>\nbecause\n</think>\n\n42", "finish_reason": "stop"}]


def _reasoning_body(field: str, reasoning: str, content: str | None) -> dict:
    msg = {"role": "assistant", "content": content, field: reasoning}
    return {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_either_reasoning_field_is_joined_into_a_think_block(field):
    """Current vLLM servers (--reasoning-parser) name the field `reasoning`, DeepSeek's API and older
    vLLM `reasoning_content`. Bug planted: reading only `reasoning_content` -> the vLLM reply is "42"
    with its reasoning lost, and the format filter drops it."""
    got = parse_choices(_reasoning_body(field, " because \n", "42"), 1)
    assert got == [{"text": "<think>\nbecause\n</think>\n\n42", "finish_reason": "stop"}]


def test_unsplit_r1_reply_gets_the_think_opening_its_prompt_had():
    """A server without a reasoning parser returns what followed `<think>\n` in the prompt. Bug planted:
    content taken as is -> "no <think>" for every R1 sample."""
    body = {"choices": [{"index": 0, "message": {"content": "a</think>\n\n42"}, "finish_reason": "stop"}]}
    assert parse_choices(body, 1)[0]["text"] == "<think>\na</think>\n\n42"
    plain = {"choices": [{"index": 0, "message": {"content": "just 42"}, "finish_reason": "stop"}]}
    assert parse_choices(plain, 1)[0]["text"] == "just 42"  # no think block at all: untouched
    own = {"choices": [{"index": 0, "message": {"content": "<think>a</think>4"}, "finish_reason": "stop"}]}
    assert parse_choices(own, 1)[0]["text"] == "<think>a</think>4"  # the model opened it itself


def test_one_request_per_sample_gets_its_own_key_and_seed():
    """Bug planted: seed + k per sample (as before) -> sample k of every question shares one seed."""
    from omegaconf import OmegaConf

    from branchmerge.data.records import Record
    from branchmerge.distill.domain import requests_for

    t = OmegaConf.create({"n": 2, "n_per_request": False})
    recs = [Record(q, "math", "s", [{"role": "user", "content": q}], "1") for q in ("q", "r")]
    reqs = requests_for(recs, t)
    assert [(r.key, r.seed_id, r.n) for r in reqs][:2] == [("q#0", "q", 1), ("q#1", "q", 1)]
    teacher = OpenAITeacher(_cfg(n=2, n_per_request=False))
    seeds = [teacher.body(r)["seed"] for r in reqs]
    assert len(set(seeds)) == 4 and seeds == [request_seed(7, r.key) for r in reqs]
    assert seeds == [OpenAITeacher(_cfg(n=2, n_per_request=False)).body(r)["seed"] for r in reqs]
    assert "seed" not in OpenAITeacher(_cfg(seed=None)).body(reqs[0])  # null: the server draws
