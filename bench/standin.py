"""A stand-in teacher: a real OpenAI-compatible HTTP server that answers from a dataset.

Used where no paid API can be reached: tests, ``kdgate bench ...`` and ``kdgate demo``. It speaks the
documented protocol (chat completions with and without streaming, ``stream_options.include_usage``,
``logprobs``/``top_logprobs``, embeddings, models, OpenAI's error envelope) and reports usage so the
gateway prices its answers with a real model's prices; and the Responses, legacy completions and
Anthropic Messages protocols (:mod:`bench.standin_native`), so a route whose teacher is an OpenAI or
Anthropic model can be called natively on those surfaces. Results obtained with it are labelled as such.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from bench import standin_native as native
from bench.asgi import Request, Send, StandinApp, error_envelope, send_bytes, send_json

__all__ = ["ReplayTeacher", "ServerThread", "count_tokens", "messages_key", "free_port"]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
NATIVE_SUFFIXES = ("/responses", "/messages", "/completions")  # besides chat completions (bench.standin_native)


def count_tokens(text: str) -> int:
    """An approximation of BPE token counts (words and punctuation), for the stand-in's usage."""
    return len(_TOKEN_RE.findall(text or ""))


def messages_key(messages: list[dict[str, Any]]) -> str:
    canon = [(m.get("role"), m.get("content")) for m in messages]
    return hashlib.sha1(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReplayTeacher(StandinApp):
    """Answers each request with the answer recorded for its messages (or ``fallback(body)``).

    ``answers`` maps :func:`messages_key` to the answer; ``confidence`` is the probability the stand-in
    reports on its answer's first token when logprobs are asked for (a real teacher's logprobs vary;
    ``confidence_fn(body, answer)`` can vary them too).
    """

    def __init__(
        self,
        answers: dict[str, str] | None = None,
        *,
        fallback: Callable[[dict[str, Any]], str] | None = None,
        model: str = "gpt-4o",
        labels: Iterable[str] = (),
        confidence_fn: Callable[[dict[str, Any], str], float] | None = None,
        latency_s: float = 0.0,
    ):
        self.answers = answers or {}
        self.fallback = fallback
        self.model = model
        self.labels = list(labels)
        self.confidence_fn = confidence_fn
        self.latency_s = latency_s
        self.calls = 0
        self.paths: Counter[str] = Counter()  # requests per path (which protocol the gateway spoke)
        self.last: dict[str, Any] = {}  # the last body per path (what the teacher was sent)
        self.fault: str | None = None  # set by tests: "500", "429", "timeout", "garbage", "cut"
        self.fault_count = 0  # how many calls the fault applies to (then it clears); 0 = forever
        self.chat_only = False  # set by tests: answer only chat completions, 404 on the native paths

    @classmethod
    def from_jsonl(cls, path: str, **kwargs: Any) -> "ReplayTeacher":
        answers = {}
        labels = set()
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    answers[messages_key(row["messages"])] = row["answer"]
                    labels.add(row["answer"])
        return cls(answers, labels=sorted(labels), **kwargs)

    def answer(self, body: dict[str, Any]) -> str:
        ans = self.answers.get(messages_key(body.get("messages") or []))
        if ans is None:
            ans = self.fallback(body) if self.fallback else "unknown"
        return ans

    # -- the ASGI app ---------------------------------------------------------------------
    async def handle(self, request: Request, send: Send) -> None:
        path = request.path
        self.calls += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        fault = self.fault
        if fault and self.fault_count:
            self.fault_count -= 1
            if self.fault_count == 0:
                self.fault = None
        if fault == "timeout":
            await asyncio.sleep(3600)
        if fault in ("500", "429", "503"):
            status = int(fault)
            headers = [(b"retry-after", b"1")] if status == 429 else []
            return await send_json(send, status, error_envelope(f"stand-in fault {status}", "server_error"), headers=headers)
        if fault == "garbage":
            return await send_bytes(send, 200, b"<html>not json")
        if request.method == "GET" and path.endswith("/models"):
            return await send_json(send, 200, {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "stand-in"}]})
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            return await send_json(send, 400, error_envelope("invalid JSON"))
        if path.endswith("/embeddings"):
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
            data = [{"object": "embedding", "index": i, "embedding": _fake_vector(str(x))} for i, x in enumerate(inputs)]
            tokens = sum(count_tokens(str(x)) for x in inputs)
            return await send_json(send, 200, {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        self.paths[path] += 1
        self.last[path] = body
        if path.endswith(NATIVE_SUFFIXES) and not path.endswith("/chat/completions"):
            if self.chat_only:  # an OpenAI-compatible server with only chat completions
                return await send_json(send, 404, error_envelope("not found"))
            if path.endswith("/messages") and fault is None and "x-api-key" not in request.headers and "authorization" not in request.headers:
                return await send_json(send, 401, native.anthropic_error("x-api-key header is required", "authentication_error"))
            answer = self.answer({"messages": native.conversation(path, body)})
            if path.endswith("/responses"):
                return await native.send_response(send, body, answer, self.model)
            if path.endswith("/messages"):
                return await native.send_message(send, body, answer, self.model)
            return await native.send_completion(send, body, answer, self.model)
        if not path.endswith("/chat/completions"):
            return await send_json(send, 404, error_envelope("not found"))
        answer = self.answer(body)
        prompt_tokens = sum(count_tokens(m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))) for m in body.get("messages") or []) + 3 * len(body.get("messages") or [])
        completion_tokens = max(1, count_tokens(answer))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
        logprobs = self._logprobs(body, answer) if body.get("logprobs") else None
        cid = "chatcmpl-standin" + hashlib.sha1(f"{time.time_ns()}".encode()).hexdigest()[:16]
        created = int(time.time())
        n = int(body.get("n") or 1)
        if not body.get("stream"):
            choices = [{"index": i, "message": {"role": "assistant", "content": answer, "refusal": None}, "logprobs": {"content": logprobs} if logprobs else None, "finish_reason": "stop"} for i in range(n)]
            resp = {"id": cid, "object": "chat.completion", "created": created, "model": self.model, "choices": choices, "usage": usage, "system_fingerprint": "fp_standin"}
            return await send_json(send, 200, resp)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model, "system_fingerprint": "fp_standin"}
        pieces = re.findall(r"\S+\s*|\s+", answer) or [""]
        events = []
        for i in range(n):
            events.append({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            for j, piece in enumerate(pieces):
                lp = {"content": [logprobs[j]]} if logprobs and j < len(logprobs) else None
                events.append({**base, "choices": [{"index": i, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}]})
            events.append({**base, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if include_usage:
            events.append({**base, "choices": [], "usage": usage})
        for k, ev in enumerate(events):
            if fault == "cut" and k == max(1, len(events) // 2):
                await send({"type": "http.response.body", "body": b"data: {\"id\": \"trunc", "more_body": False})
                return
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(ev) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _logprobs(self, body: dict[str, Any], answer: str) -> list[dict[str, Any]]:
        top_n = int(body.get("top_logprobs") or 0)
        p = self.confidence_fn(body, answer) if self.confidence_fn else 0.99
        p = min(max(p, 1e-6), 1 - 1e-6)
        pieces = re.findall(r"\S+\s*|\s+", answer) or [answer]
        out = []
        for j, piece in enumerate(pieces):
            lp = math.log(p) if j == 0 else math.log(0.999)
            entry = {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
            if top_n and j == 0:
                alts = [piece] + [lab for lab in self.labels if lab != answer][: top_n - 1]
                rest = (1 - p) / max(1, len(alts) - 1)
                entry["top_logprobs"] = [
                    {"token": a, "logprob": math.log(p if a == piece else rest), "bytes": list(a.encode())} for a in alts
                ]
            elif top_n:
                entry["top_logprobs"] = [{"token": piece, "logprob": lp, "bytes": list(piece.encode())}]
            out.append(entry)
        return out


def _fake_vector(text: str, dim: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255.0 for b in digest[:dim]]


class ServerThread:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (tests, benches, demo)."""

    def __init__(self, app: Any, *, port: int | None = None, host: str = "127.0.0.1", log_level: str = "warning", **config: Any):
        import uvicorn

        self.host = host
        self.port = port or free_port()
        self.config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, lifespan="on", access_log=False, **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.standin --port P [--dataset PATH] [--model M]``: serve a stand-in teacher."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="kdgate's stand-in OpenAI-compatible teacher")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--dataset", help="JSONL stream whose answers to replay")
    parser.add_argument("--model", default="gpt-4o")
    args = parser.parse_args(argv)
    if args.dataset:
        app = ReplayTeacher.from_jsonl(args.dataset, model=args.model)
    else:
        app = ReplayTeacher(fallback=lambda body: "ok", model=args.model)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
