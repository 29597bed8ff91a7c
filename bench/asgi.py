"""The raw-ASGI plumbing every stand-in server shares: lifespan, the request, JSON and text answers.

Stand-ins (the replay teacher, the capture server, the vLLM stand-in) are small ASGI apps served by
uvicorn on loopback. Each subclasses :class:`StandinApp` and writes only :meth:`StandinApp.handle`;
the lifespan protocol, reading a (possibly chunked) body and the two ``http.response`` messages are
here once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Request", "StandinApp", "Send", "read_body", "send_bytes", "send_json", "send_text", "error_envelope"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Request:
    """One HTTP request as a stand-in sees it: header names lower-case, the whole body read."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON (``{}`` when empty); raises ``orjson.JSONDecodeError`` when it is not JSON."""
        return orjson.loads(self.body) if self.body else {}


async def read_body(receive: Receive) -> bytes:
    """The request body, however many ``http.request`` messages it came in."""
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def send_bytes(send: Send, status: int, body: bytes, *, content_type: bytes = b"application/json",
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete response: status, content type and length, ``headers``, then ``body``."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, value: Any, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """``value`` as a JSON response."""
    await send_bytes(send, status, orjson.dumps(value), headers=headers)


async def send_text(send: Send, status: int, text: str) -> None:
    """``text`` as a plain-text response."""
    await send_bytes(send, status, text.encode(), content_type=b"text/plain; charset=utf-8")


def error_envelope(message: str, err_type: str = "invalid_request_error", code: Any = None) -> dict[str, Any]:
    """OpenAI's error envelope ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class StandinApp:
    """Base of the stand-in ASGI apps: answers the lifespan, reads the request, calls :meth:`handle`."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request = Request(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), headers,
                          await read_body(receive))
        await self.handle(request, send)

    async def handle(self, request: Request, send: Send) -> None:
        """Answer ``request`` through ``send`` (subclasses; streaming answers send their own messages)."""
        raise NotImplementedError
