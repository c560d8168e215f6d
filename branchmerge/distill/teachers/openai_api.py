"""The `openai` teacher: any OpenAI-compatible chat-completions endpoint (vLLM/SGLang server, hosted API).

    POST {base_url}/chat/completions   {"model", "messages", "n", "temperature", "top_p", "max_tokens",
                                        "seed"?, **extra_body}   header X-Request-Id: <request key>
    -> {"choices": [{"index", "message": {"content", "reasoning"? | "reasoning_content"?},
                     "finish_reason"}], "usage"}

Asynchronous (httpx) with at most `concurrency` requests in flight, a per-request `timeout_s`, and
retries with exponential backoff (backoff_s * 2^attempt, capped at backoff_max_s, jittered; a
Retry-After header wins) on connection errors, timeouts, 408/409/429 and 5xx. Other 4xx fail at once.
A server that returns R1's reasoning separately is joined back into `<think>\\nreasoning\\n</think>\\n\\nanswer`:
the field is `reasoning` on current vLLM servers (`--reasoning-parser`), `reasoning_content` on
DeepSeek's API and older vLLM; whichever is present is read. A server that does not split (no parser)
returns the text after the prompt, which for R1-family templates starts inside the think block the
prompt opened: a reply with a `</think>` but no `<think>` before it gets the `<think>\\n` back.
The seed of each request is `request_seed(teacher.seed, key)` (see teachers/__init__.py); no seed is
sent when teacher.seed is null. The API key is read from the environment variable `api_key_env`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import httpx
from omegaconf import DictConfig, OmegaConf

from branchmerge.distill.teachers import GenRequest, GenResult, request_seed, with_seed
from branchmerge.errors import ConfigError
from branchmerge.verify.extract import THINK_CLOSE, THINK_OPEN

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class _Fatal(Exception):
    """A response that retrying cannot fix (bad request, auth, malformed body)."""


def message_text(msg: dict) -> str:
    """One reply as `<think>reasoning</think>answer`, however the server returned the reasoning."""
    text = msg.get("content") or ""
    reasoning = msg.get("reasoning") or msg.get("reasoning_content")
    if reasoning:
        return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{text.strip()}"
    head, closed, _ = text.partition(THINK_CLOSE)
    if closed and THINK_OPEN not in head:  # the prompt opened the think block (R1 templates)
        return f"{THINK_OPEN}\n{text}"
    return text


def parse_choices(body: dict, n: int) -> list[dict[str, str]]:
    """[{"text", "finish_reason"}] from a chat-completions response, in choice order."""
    try:
        choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
        out = []
        for c in choices:
            out.append({"text": message_text(c["message"]), "finish_reason": c.get("finish_reason") or ""})
    except (KeyError, TypeError, AttributeError) as e:
        raise _Fatal(f"malformed chat-completions response: {e!r}: {str(body)[:200]}") from e
    if len(out) != n:
        raise _Fatal(f"asked for n={n} choices, got {len(out)}")
    return out


class OpenAITeacher:
    def __init__(self, cfg: Any, transport: httpx.AsyncBaseTransport | None = None):
        self.transport = transport  # tests inject httpx.MockTransport; None = the network
        if not cfg.base_url or not cfg.model:
            raise ConfigError(
                "teacher=openai needs teacher.base_url (e.g. http://host:8000/v1) and teacher.model"
            )
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env or "", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, req: GenRequest) -> dict[str, Any]:
        c = self.cfg
        body = {
            "model": c.model,
            "messages": req.messages,
            "n": req.n,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "max_tokens": c.max_new_tokens,
        }
        seed = request_seed(c.seed, req.key)
        if seed is not None:
            body["seed"] = seed
        extra = c.extra_body or {}
        return {**body, **(OmegaConf.to_container(extra) if isinstance(extra, DictConfig) else dict(extra))}

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.cfg.backoff_max_s)
            except ValueError:
                pass
        base = min(self.cfg.backoff_s * 2**attempt, self.cfg.backoff_max_s)
        return base * random.uniform(0.5, 1.0)

    async def one(self, client: httpx.AsyncClient, req: GenRequest) -> GenResult:
        """POST one request, retrying transient failures; raises after max_retries retries."""
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                resp = await client.post(
                    "chat/completions", json=self.body(req), headers={"X-Request-Id": req.key}
                )
                if resp.status_code == 200:
                    body = resp.json()
                    return GenResult(
                        req.key,
                        req.seed_id,
                        with_seed(parse_choices(body, req.n), request_seed(self.cfg.seed, req.key)),
                        body.get("usage") or {},
                        body.get("model", ""),
                    )
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUS:
                    raise _Fatal(last)
                retry_after = resp.headers.get("retry-after")
            except httpx.TransportError as e:  # connect refused/reset, read/write/pool timeouts
                last = f"{type(e).__name__}: {e}"
            if attempt < self.cfg.max_retries:
                wait = self.delay(attempt, retry_after)
                log.debug("request %s: %s; retry %d in %.2fs", req.key, last, attempt + 1, wait)
                await asyncio.sleep(wait)
        raise RuntimeError(f"request {req.key} failed after {self.cfg.max_retries} retries: {last}")

    async def _run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        failed: list[str] = []
        base = self.cfg.base_url.rstrip("/") + "/"
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        timeout = httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s))

        async with httpx.AsyncClient(
            base_url=base, headers=self.headers, timeout=timeout, limits=limits, transport=self.transport
        ) as client:

            async def task(req: GenRequest) -> None:
                async with sem:
                    try:
                        result = await self.one(client, req)
                    except (RuntimeError, _Fatal) as e:
                        log.error("%s", e)
                        failed.append(req.key)
                        return
                on_done(result)  # journalled (flushed + fsynced) before the next one is counted

            await asyncio.gather(*(task(r) for r in requests))
        return failed

    def run(self, requests: list[GenRequest], on_done: Callable[[GenResult], None]) -> list[str]:
        return asyncio.run(self._run(requests, on_done))
