"""Serve a local Hugging Face causal LM through the OpenAI chat-completions protocol (stdlib HTTP, CPU).

    python -m branchmerge.distill.serve --model <hf folder> [--host 127.0.0.1] [--port 0]
                                        [--request-log requests.log] [--delay-s 0]
                                        [--reasoning-field reasoning|reasoning_content]

Prints "listening on http://HOST:PORT/v1" once ready (port 0 picks a free port). Endpoints:
    GET  /v1/models
    POST /v1/chat/completions  {"model", "messages", "n"=1, "temperature"=1, "top_p"=1, "max_tokens"=256,
                                "seed"?}
      -> {"id", "object": "chat.completion", "created", "model",
          "choices": [{"index", "message": {"role": "assistant", "content", <reasoning field>?},
                       "finish_reason": "stop"|"length"}],
          "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
Requests are generated one at a time (a lock around the model). With --request-log, the X-Request-Id
header of every request is appended (and flushed) when it arrives, as "recv <id> seed=<seed>", and as
"done <id>" when its response was written: a test proves from it which requests a client sent, with
which seeds. --delay-s adds latency per request (to simulate a slow teacher). The reply text starts
with the think block the model's chat template opened (R1: `<think>\\n`, see `reopen_think`).
--reasoning-field splits it as vLLM's `--reasoning-parser deepseek_r1` does: the reasoning (inside
`<think>…</think>`, all of the text when never closed) goes to that field (`reasoning`, current vLLM;
`reasoning_content`, DeepSeek's API and older vLLM), the rest to `content`. For a real teacher use
vLLM's own server instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from branchmerge.verify.extract import THINK_CLOSE, THINK_OPEN, reopen_think


def generate_chat(
    model, tok, messages, n: int, temperature: float, top_p: float, max_tokens: int, seed: int | None = None
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """n sampled replies to a chat: ([{"text", "finish_reason"}] * n, usage).

    Each text starts with the think block the rendered prompt opened, if it opened one.
    """
    import torch

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    kwargs = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    )
    eos = [
        t
        for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        if isinstance(t, int) and t >= 0
    ]
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_tokens,
            num_return_sequences=n,
            eos_token_id=eos or None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
            **kwargs,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    samples, completion = [], 0
    for row in new:
        ids = row.tolist()
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        kept = ids if stop is None else ids[:stop]
        completion += len(kept)
        reason = "stop" if stop is not None or len(ids) < max_tokens else "length"
        out_text = reopen_think(text, tok.decode(kept, skip_special_tokens=True))
        samples.append({"text": out_text, "finish_reason": reason})
    prompt = int(enc["input_ids"].shape[1])
    return samples, {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, content) of `<think>reasoning</think>content`; all reasoning when never closed,
    no reasoning when no think block was opened."""
    if not text.lstrip().startswith(THINK_OPEN):
        return "", text
    body = text.lstrip()[len(THINK_OPEN) :]
    reasoning, closed, content = body.partition(THINK_CLOSE)
    return reasoning, content if closed else ""


def message(text: str, reasoning_field: str | None) -> dict[str, str]:
    """The assistant message of one choice: the whole text as content, or split (--reasoning-field)."""
    if not reasoning_field:
        return {"role": "assistant", "content": text}
    reasoning, content = split_reasoning(text)
    return {"role": "assistant", "content": content, reasoning_field: reasoning}


class _Handler(BaseHTTPRequestHandler):
    server: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # quiet; the request log is the record
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        rid = self.headers.get("X-Request-Id", "-")
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages, n = req["messages"], int(req.get("n", 1))
        except (ValueError, KeyError, TypeError) as e:
            self.server.log(f"recv {rid} seed=-")
            self._send(400, {"error": {"message": f"bad request: {e!r}"}})
            return
        self.server.log(f"recv {rid} seed={req.get('seed')}")
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        try:
            with self.server.lock:
                samples, usage = generate_chat(
                    self.server.model,
                    self.server.tok,
                    messages,
                    n,
                    float(req.get("temperature", 1.0)),
                    float(req.get("top_p", 1.0)),
                    int(req.get("max_tokens", 256)),
                    req.get("seed"),
                )
        except Exception as e:  # a generation error is the server's fault: 500, the client retries
            self._send(500, {"error": {"message": f"generation failed: {e!r}"}})
            return
        choices = [
            {
                "index": i,
                "message": message(s["text"], self.server.reasoning_field),
                "finish_reason": s["finish_reason"],
            }
            for i, s in enumerate(samples)
        ]
        self._send(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.server.model_name,
                "choices": choices,
                "usage": usage,
            },
        )
        self.server.log(f"done {rid}")


def make_server(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 0,
    request_log: str | None = None,
    delay_s: float = 0.0,
    reasoning_field: str | None = None,
) -> ThreadingHTTPServer:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.tok = AutoTokenizer.from_pretrained(model_dir)
    server.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    server.model_name = model_dir.rstrip("/").split("/")[-1]
    server.lock, server.delay_s, server.reasoning_field = threading.Lock(), delay_s, reasoning_field
    log_f = open(request_log, "a", encoding="utf-8") if request_log else None  # noqa: SIM115
    log_lock = threading.Lock()

    def log(line: str) -> None:
        if log_f is not None:
            with log_lock:
                log_f.write(line + "\n")
                log_f.flush()

    server.log = log
    return server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--request-log", default=None)
    ap.add_argument("--delay-s", type=float, default=0.0)
    ap.add_argument("--reasoning-field", choices=("reasoning", "reasoning_content"), default=None)
    args = ap.parse_args(argv)
    server = make_server(
        args.model, args.host, args.port, args.request_log, args.delay_s, args.reasoning_field
    )
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
