"""A capture server: a real HTTP server on loopback that records every request it gets.

It stands for an attacker's host in the security tests (does the gateway ever send the operator's
provider key, or anything, to it?) and for a provider whose requests a test inspects. It answers in
the protocol the path asks for: Anthropic's Messages (``/v1/messages``) or OpenAI's chat completions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.asgi import Request, Send, StandinApp, send_json

__all__ = ["CaptureServer", "Captured"]


class Captured(Request):
    """A request as it arrived (the stand-ins' Request), except that an empty body reads as None."""

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass
class CaptureServer(StandinApp):
    """ASGI app; ``requests`` holds what arrived, oldest first."""

    answer: str = "captured"
    requests: list[Captured] = field(default_factory=list)

    def seen(self, text: str) -> bool:
        """Whether ``text`` appeared anywhere in a captured request (headers, path or body)."""
        needle = text.encode()
        for r in self.requests:
            if needle in r.body or text in r.path or text in r.query or any(text in v for v in r.headers.values()):
                return True
        return False

    async def handle(self, request: Request, send: Send) -> None:
        self.requests.append(Captured(request.method, request.path, request.query, request.headers, request.body))
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            body = {}
        if request.path.endswith("/messages"):
            reply = {
                "id": "msg_capture", "type": "message", "role": "assistant", "model": body.get("model", "claude"),
                "content": [{"type": "text", "text": self.answer}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 2},
            }
        else:
            reply = {
                "id": "chatcmpl-capture", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "m"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            }
        await send_json(send, 200, reply)
