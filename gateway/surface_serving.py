"""Serving the surfaces besides chat completions: OpenAI's Responses and legacy completions,
Anthropic's Messages. Free of the web framework, like :mod:`gateway.serving`.

Each request is turned into its chat form (:mod:`gateway.surfaces`) and served by
:meth:`gateway.serving.ChatService.chat` like any chat request: the same route (so one task has one
route, and one student, whatever door it came through), limits, student or teacher, ledger row and
``x-kdgate-*`` headers. What comes back in chat form (a student's answer, a chat teacher's) is turned
into the surface's own body or SSE events here; a teacher that speaks the surface natively answers
in it already (``Reply.native``) and passes through.

Responses are stored (``store``, true by default) before the client gets them, so a follow-up with
``previous_response_id`` and ``GET /v1/responses/{id}`` always find them: the response as returned and
the conversation's items up to it, readable only with the key that created it, for
``responses_ttl_days``. Storing costs the request a queue put, not a database round trip: the row
goes through the ledger's writer (committed within its flush window, like the exchange row) and
stays in this process's :class:`RecentResponses` meanwhile; a lookup that misses both waits one
flush window and asks the store again, so a follow-up that reaches another replica first still
finds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from gateway.auth import Principal
from gateway.errors import GatewayError, NotFound, UpstreamError
from gateway.serving import ChatService, Reply, SurfaceCall, new_uid, teacher_body
from gateway.surfaces import ChatRequest, completions, messages, responses
from gateway.teacher import sse_data
from store import Ledger

__all__ = ["SurfaceService", "RecentResponses"]

_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")


class RecentResponses:
    """The responses this process stored that the writer has not committed yet (and, while the
    database is away, still holds), bounded by their bytes: what a lookup finds meanwhile. Once a
    row's ``committed`` event is set the store answers for it, so a delete made through another
    replica is seen here too."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._rows: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @staticmethod
    def _size(row: dict[str, Any]) -> int:
        return len(row["items"]) + len(row["response"]) + 256

    def put(self, row: dict[str, Any]) -> None:
        """Remember ``row`` (its ``committed`` event included); rows committed since go (the writer
        commits in order, so they are the oldest), and the oldest past ``max_bytes``."""
        self.pop(row["id"])
        self._rows[row["id"]] = row
        self.bytes += self._size(row)
        while self._rows and (self.bytes > self.max_bytes or next(iter(self._rows.values()))["committed"].is_set()):
            self.bytes -= self._size(self._rows.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, response_id: str, *, key_id: str, now: float) -> dict[str, Any] | None:
        row = self._rows.get(response_id)
        if row is not None and row["committed"].is_set():
            self.pop(response_id)
            return None
        return row if row is not None and row["key_id"] == key_id and row["expires"] >= now else None

    def pop(self, response_id: str) -> None:
        row = self._rows.pop(response_id, None)
        if row is not None:
            self.bytes -= self._size(row)


class SurfaceService:
    PURGE_EVERY = 200  # stored responses between two purges of the expired ones

    def __init__(self, chat: ChatService, ledger: Ledger, *, responses_ttl_s: float = 30 * 86400,
                 recent: RecentResponses | None = None):
        self.chat = chat
        self.ledger = ledger
        self.responses_ttl_s = responses_ttl_s
        self.recent = recent or RecentResponses()
        self._puts = 0

    # -- Responses ----------------------------------------------------------------------------
    async def responses(self, body: dict[str, Any], *, principal: Principal, headers: dict[str, str]) -> Reply:
        """``POST /v1/responses``, plain or streamed."""
        uid, t0, ts = new_uid(), time.perf_counter(), time.time()
        with self._failures("responses", uid, t0, ts, body, principal):
            responses.validate(body)
            earlier: list[dict[str, Any]] = []
            previous = body.get("previous_response_id")
            if previous:
                stored = await self._stored(previous, key_id=principal.key_id, now=ts)
                if stored is None:
                    raise NotFound(f"Previous response with id '{_printable(previous)}' not found.",
                                   param="previous_response_id", code="previous_response_not_found")
                earlier = orjson.loads(stored["items"])
            own = _items(body["input"])
            # the conversation so far, then this request's input: what both a chat form and a native
            # teacher are given (the store, not the teacher, keeps the conversation)
            whole = {k: v for k, v in body.items() if k != "previous_response_id"}
            whole["input"] = earlier + own
            creq = responses.to_chat(whole)
            native, _ = teacher_body(whole, surface="responses", params=self.chat.params)
        response_id, created = "resp_" + uid[4:], int(ts)
        keep: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        if responses.should_store(body):
            async def keep(response: dict[str, Any]) -> None:
                output = [item for item in response.get("output") or [] if item.get("type") != "reasoning"]
                await self._keep({
                    "id": response.get("id") or response_id, "key_id": principal.key_id,
                    "route": reply.headers.get("x-kdgate-route"), "ts": ts, "expires": ts + self.responses_ttl_s,
                    "items": orjson.dumps(earlier + own + output).decode(), "response": orjson.dumps(response).decode(),
                })

        reply = await self._serve("responses", creq, native, principal, headers, uid, t0, ts)
        if reply.native:
            if reply.stream is not None:
                reply.stream = _hold_terminal(reply.stream, keep)
            elif keep is not None:
                await keep(orjson.loads(reply.body))
            return reply
        if reply.stream is None:
            answer = responses.from_chat(orjson.loads(reply.body), body, response_id=response_id, created=created)
            if keep is not None:
                await keep(answer)
            reply.body = orjson.dumps(answer)
            return reply
        stream = responses.ResponsesStream(body, response_id=response_id, created=created)

        async def stored() -> None:
            if keep is not None and stream.response is not None and stream.response.get("status") != "failed":
                await keep(stream.response)

        reply.stream = _converted(reply.stream, stream, before_last=stored)
        return reply

    async def _keep(self, row: dict[str, Any]) -> None:
        """Store a response: this process remembers it at once, the writer commits it within its
        flush window; with the writer's queue full it is written now (or the request fails)."""
        self._puts += 1
        purge = row["ts"] if self._puts % self.PURGE_EVERY == 1 else None
        if self.chat.writer.put_response(row, purge_before=purge):
            self.recent.put({**row, "committed": self.chat.writer.mark()})
        else:
            await asyncio.to_thread(self.ledger.put_response, row["id"], **{k: v for k, v in row.items() if k != "id"})

    async def _stored(self, response_id: str, *, key_id: str, now: float) -> dict[str, Any] | None:
        """A stored response of this key: from this process's recent ones, else the store; a miss
        is asked again after one flush window (another replica's writer may not have committed it yet)."""
        row = self.recent.get(response_id, key_id=key_id, now=now)
        if row is not None:
            return row
        row = await asyncio.to_thread(self.ledger.stored_response, response_id, key_id=key_id, now=now)
        if row is None:
            await asyncio.sleep(2 * self.chat.writer.flush_s + 0.05)
            row = await asyncio.to_thread(self.ledger.stored_response, response_id, key_id=key_id, now=now)
        return row

    async def stored_response(self, response_id: str, *, principal: Principal) -> Reply:
        """``GET /v1/responses/{id}``: a stored response of this key."""
        stored = await self._stored(response_id, key_id=principal.key_id, now=time.time())
        if stored is None:
            raise NotFound(f"Response with id '{_printable(response_id)}' not found.", param="response_id")
        return Reply(body=stored["response"].encode(), headers={"x-request-id": new_uid()})

    async def delete_response(self, response_id: str, *, principal: Principal) -> Reply:
        """``DELETE /v1/responses/{id}``: after the writer has committed what it holds (so a queued
        store cannot bring the response back)."""
        found = await self._stored(response_id, key_id=principal.key_id, now=time.time()) is not None
        if found:
            await asyncio.to_thread(self.chat.writer.flush)
            self.recent.pop(response_id)
        if not found or not await asyncio.to_thread(self.ledger.delete_response, response_id, key_id=principal.key_id):
            raise NotFound(f"Response with id '{_printable(response_id)}' not found.", param="response_id")
        return Reply(body=orjson.dumps({"id": response_id, "object": "response", "deleted": True}),
                     headers={"x-request-id": new_uid()})

    # -- Anthropic Messages ---------------------------------------------------------------------
    async def messages(self, body: dict[str, Any], *, principal: Principal, headers: dict[str, str]) -> Reply:
        """``POST /v1/messages``, plain or streamed."""
        uid, t0, ts = new_uid(), time.perf_counter(), time.time()
        with self._failures("messages", uid, t0, ts, body, principal):
            messages.validate(body)
            creq = messages.to_chat(body)
            native, _ = teacher_body(body, surface="messages", params=self.chat.params)
        reply = await self._serve("messages", creq, native, principal, headers, uid, t0, ts)
        reply.headers["request-id"] = uid  # Anthropic's name for it (its SDKs' request_id)
        if reply.native:
            return reply
        message_id = "msg_" + uid[4:]
        if reply.stream is None:
            reply.body = orjson.dumps(messages.from_chat(orjson.loads(reply.body), body, response_id=message_id))
        else:
            reply.stream = _converted(reply.stream, messages.MessagesStream(body, response_id=message_id))
        return reply

    def count_tokens(self, body: dict[str, Any]) -> Reply:
        """``POST /v1/messages/count_tokens``: the gateway's estimate (no teacher is called)."""
        counted = messages.count_tokens(body)
        if not self.chat.routes.knows_model(body["model"]):
            self.chat.routes.teacher_for(body["model"])  # raises model_not_found
        return Reply(body=orjson.dumps(counted), headers={"x-request-id": new_uid()})

    # -- legacy completions ---------------------------------------------------------------------
    async def completions(self, body: dict[str, Any], *, principal: Principal, headers: dict[str, str]) -> Reply:
        """``POST /v1/completions``, plain or streamed."""
        uid, t0, ts = new_uid(), time.perf_counter(), time.time()
        with self._failures("completions", uid, t0, ts, body, principal):
            completions.validate(body)
            creq = completions.to_chat(body)
            native, _ = teacher_body(body, surface="completions", params=self.chat.params)
            asked_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if body.get("stream"):  # the ledger prices the answer from the usage chunk
                native["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        reply = await self._serve("completions", creq, native, principal, headers, uid, t0, ts)
        if reply.native:
            if reply.stream is not None and not asked_usage:
                reply.stream = _without_usage_chunk(reply.stream)  # asked for the ledger, not by the client
            return reply
        completion_id, created = "cmpl-" + uid[4:], int(ts)
        if reply.stream is None:
            reply.body = orjson.dumps(completions.from_chat(orjson.loads(reply.body), body, response_id=completion_id,
                                                            created=created))
        else:
            reply.stream = _converted(reply.stream, completions.CompletionsStream(body, response_id=completion_id,
                                                                                  created=created))
        return reply

    # -- shared ---------------------------------------------------------------------------------
    async def _serve(self, name: str, creq: ChatRequest, native: dict[str, Any], principal: Principal,
                     headers: dict[str, str], uid: str, t0: float, ts: float) -> Reply:
        module = {"responses": responses, "messages": messages, "completions": completions}[name]
        call = SurfaceCall(name=name, native_body=native, to_chat=module.from_native_to_chat,
                           assemble=module.assemble_native_stream, unmapped=creq.unmapped, refuse_chat=creq.require_chat)
        reply = await self.chat.chat(creq.body, principal=principal, headers=headers, uid=uid, t0=t0, ts=ts, surface=call)
        if not reply.native:
            reply.headers.update(creq.header())
        return reply

    def _failures(self, endpoint: str, uid: str, t0: float, ts: float, body: Any, principal: Principal) -> Any:
        """A request refused before it reaches the chat service is still a ledger row (and its
        error's ``x-request-id`` names that row), as on the chat surface."""
        return _logged_failure(self.chat, endpoint, uid, t0, ts, body, principal)


@contextmanager
def _logged_failure(chat: ChatService, endpoint: str, uid: str, t0: float, ts: float, body: Any,
                    principal: Principal) -> Iterator[None]:
    try:
        yield
    except GatewayError as exc:
        chat._log_failure(uid=uid, ts=ts, t0=t0, route=None, body=body, principal=principal, exc=exc, endpoint=endpoint)
        raise


async def _without_usage_chunk(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A completions stream less its final usage chunk (no choices, only usage), as OpenAI sends
    it only to a client that asked for ``include_usage``."""
    async for event in events:
        payload = sse_data(event)
        if payload and payload.startswith(b"{") and b'"usage"' in payload:
            try:
                value = orjson.loads(payload)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, dict) and value.get("choices") == [] and value.get("usage"):
                continue
        yield event


def _items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Responses ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


async def _converted(chat_events: AsyncIterator[bytes], stream: Any,
                     before_last: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
    """A chat-completions SSE stream (a student's or a chat teacher's) as the surface's events.
    ``before_last`` runs after the answer is complete and before its final event is sent."""
    if hasattr(stream, "start"):
        for piece in stream.start():
            yield piece
    try:
        async for event in chat_events:
            if event.startswith(b":"):  # a keep-alive comment
                yield event
                continue
            payload = sse_data(event)
            if not payload or payload == b"[DONE]":
                continue
            chunk = orjson.loads(payload)
            if chunk.get("error") and not chunk.get("choices"):  # the chat stream's in-band failure
                failure = chunk["error"] if isinstance(chunk["error"], dict) else {}
                for piece in stream.error(UpstreamError(str(failure.get("message") or "The answer's stream failed."))):
                    yield piece
                return
            for piece in stream.feed(chunk):
                yield piece
    finally:
        await _close(chat_events)
    last = stream.finish()
    if before_last is not None:
        await before_last()
    for piece in last:
        yield piece


async def _hold_terminal(events: AsyncIterator[bytes], keep: Callable[[dict[str, Any]], Awaitable[None]] | None) -> AsyncIterator[bytes]:
    """A native Responses stream, passed on; its final response is stored before its final event goes out."""
    try:
        async for event in events:
            if keep is not None and event.startswith(b"event: response.") and any(t in event[:40] for t in _TERMINAL):
                payload = sse_data(event)
                try:
                    final = orjson.loads(payload).get("response") if payload else None
                except orjson.JSONDecodeError:
                    final = None
                if isinstance(final, dict) and final.get("status") != "failed":
                    await keep(final)
            yield event
    finally:
        await _close(events)


async def _close(events: AsyncIterator[bytes]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in str(text)[:200])

