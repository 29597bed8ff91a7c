"""The logic of the model endpoints, free of the web framework (vLLM's serving/protocol split).

``ChatService.handle`` takes the parsed body and the caller, asks the router whether a student may
answer, calls the teacher otherwise, and writes one ledger row per exchange (failures included).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.auth import Principal
from gateway.money import Money, Usage, format_usd
from gateway.errors import GatewayError, PermissionDenied, UpstreamError, UpstreamStatus
from store import LedgerWriter
from gateway.limits import estimate_prompt_tokens, requested_output_tokens
from gateway.params import ParamPolicy, is_provider_option
from gateway.protocol import answer_of, assemble_stream, validate_chat, validate_embeddings
from gateway.routing import Route, RouteTable
from gateway.teacher import TeacherClient, TeacherResponse, TeacherStream, TeacherTarget, sse_data

log = logging.getLogger(__name__)

__all__ = ["ChatService", "Reply", "SurfaceCall", "new_uid"]


def new_uid() -> str:
    return "kdg-" + secrets.token_hex(12)


@dataclass
class Reply:
    """What the web layer sends: a JSON body or an SSE event stream, plus headers."""

    status: int = 200
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    native: bool = False  # the body or stream is already in the request's surface format (a native teacher's)


@dataclass(frozen=True)
class SurfaceCall:
    """A request that came through a surface other than chat completions (Responses, Messages,
    legacy completions), served as its chat form.

    The route, the student and the ledger see the chat form; a teacher that speaks the surface
    natively (:meth:`gateway.teacher.TeacherClient.speaks`) gets ``native_body`` instead, and its
    answer is logged as ``to_chat(answer)`` (``assemble(events)`` first, for a stream)."""

    name: str  # the surface, and the ledger row's endpoint: "responses" | "messages" | "completions"
    native_body: dict[str, Any]
    to_chat: Callable[[dict[str, Any]], dict[str, Any]]
    assemble: Callable[[list[dict[str, Any]]], dict[str, Any] | None]
    unmapped: tuple[str, ...] = ()  # fields only a native teacher can serve (no student, no chat teacher)
    refuse_chat: Callable[[], None] | None = None  # raises the surface's BadRequest for ``unmapped``


# The surface of the request being served, read where the teacher is called and rows are logged;
# set by ChatService.chat for the request's own task (the student's path goes through unchanged).
_SURFACE: ContextVar[SurfaceCall | None] = ContextVar("kdgate_surface", default=None)


def _endpoint(surface: SurfaceCall | None) -> str:
    """The ledger row's endpoint for a request from ``surface`` (None: chat completions)."""
    return surface.name if surface is not None else "chat.completions"


_DEFAULT_PARAMS = ParamPolicy()


def teacher_body(body: dict[str, Any], *, surface: str = "chat.completions", params: ParamPolicy | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The body the teacher gets (the surface's allowed fields of the client's, less what only the
    gateway reads: ``metadata.route``), and the ``x-kdgate-ignored-params`` header when fields were
    dropped. Raises BadRequest for a provider option (see :mod:`gateway.params`)."""
    forwarded = (params or _DEFAULT_PARAMS).forward(surface, body)
    out = forwarded.body
    meta = out.get("metadata")
    if isinstance(meta, dict) and "route" in meta:
        rest = {k: v for k, v in meta.items() if k != "route"}
        if rest:
            out["metadata"] = rest
        else:
            out.pop("metadata")
    return out, forwarded.header()


def _logged_request(body: dict[str, Any]) -> str:
    """The request as the ledger stores it: no provider options (a client-sent api_key included)."""
    return orjson.dumps({k: v for k, v in body.items() if not is_provider_option(k)}).decode()


class ChatService:
    def __init__(
        self,
        *,
        routes: RouteTable,
        teacher: TeacherClient,
        money: Money,
        writer: LedgerWriter,
        metrics: Any = None,
        students: Any = None,
        limiter: Any = None,
        params: ParamPolicy | None = None,
    ):
        self.limiter = limiter
        self.params = params or _DEFAULT_PARAMS
        self.routes = routes
        self.teacher = teacher
        self.money = money
        self.writer = writer
        self.metrics = metrics
        self.students = students  # router hook (gateway.students.StudentRouter) when enabled

    # -- chat completions -----------------------------------------------------------------
    async def chat(self, body: dict[str, Any], *, principal: Principal, headers: dict[str, str], uid: str | None = None,
                   t0: float | None = None, ts: float | None = None, surface: SurfaceCall | None = None) -> Reply:
        """Answer one chat-completions body (a surface's chat form when ``surface`` is given)."""
        t0 = t0 if t0 is not None else time.perf_counter()
        ts = ts if ts is not None else time.time()
        uid = uid or new_uid()
        route: Route | None = None
        token = _SURFACE.set(surface) if surface is not None else None
        try:
            validate_chat(body)
            forwarded = teacher_body(body, params=self.params)  # refuses provider options up front
            await self._off_loop(self._check_limits, principal, body)  # before anything is learned from the request
            route = self.routes.resolve(body, headers.get("x-kdgate-route"), uid, principal=principal)
            native_only = surface is not None and bool(surface.unmapped)
            if native_only and not self.teacher.speaks(route.teacher, surface.name) and surface.refuse_chat is not None:
                surface.refuse_chat()  # hosted tools, stored prompts...: only a native teacher can serve them
            await self._off_loop(self._reserve_budget, principal, route, body, uid)
            if self.students is not None and not native_only:
                reply = await self.students.try_student(
                    route=route, body=body, principal=principal, headers=headers, uid=uid, ts=ts, t0=t0
                )
                if reply is not None:
                    return reply
            return await self.teacher_chat(route=route, body=body, principal=principal, uid=uid, ts=ts, t0=t0,
                                           forwarded=forwarded)
        except GatewayError as exc:
            self._log_failure(uid=uid, ts=ts, t0=t0, route=route, body=body, principal=principal, exc=exc,
                              endpoint=_endpoint(surface))
            raise
        finally:
            if token is not None:
                _SURFACE.reset(token)

    async def teacher_chat(
        self,
        *,
        route: Route,
        body: dict[str, Any],
        principal: Principal,
        uid: str,
        ts: float,
        t0: float,
        extra_row: dict[str, Any] | None = None,
        extra_headers: dict[str, str] | None = None,
        on_answer: Any = None,
        forwarded: tuple[dict[str, Any], dict[str, str]] | None = None,
    ) -> Reply:
        """Answer from the teacher and log the exchange (the student path escalates through here).

        ``on_answer(answer_text)``, if given, is awaited once the teacher's answer is known and may
        return more columns for the ledger row (the shadow student's answer and confidence).
        """
        upstream, ignored = forwarded or teacher_body(body, params=self.params)
        upstream = dict(upstream)  # the stream path adds stream_options to it
        surface = _SURFACE.get()
        endpoint = _endpoint(surface)
        headers = {
            "x-kdgate-route": route.name,
            "x-kdgate-served-by": "teacher",
            "x-request-id": uid,
            **ignored,
            **(extra_headers or {}),
        }
        if body.get("stream"):
            return await self._teacher_stream(route, body, upstream, principal, uid, ts, t0, headers, extra_row, on_answer,
                                              surface=surface)
        t_up = time.perf_counter()
        target, resp = await self._with_fallbacks(route, lambda t: self._teacher_answer(t, upstream, surface))
        upstream_s = time.perf_counter() - t_up
        if on_answer is not None:
            extra_row = {**(extra_row or {}), **(await on_answer(answer_of(resp.body)[0]) or {})}
        usage = Usage.from_openai(resp.body.get("usage"))
        cost = self.money.teacher_cost(target.model, usage)
        headers["x-kdgate-cost-usd"] = format_usd(cost)
        headers.update(resp.headers)
        if target is not route.teacher:
            headers["x-kdgate-teacher"] = target.model
        self._log_teacher(
            uid=uid, ts=ts, t0=t0, route=route, body=body, principal=principal, response=resp.body,
            usage=usage, cost=cost, stream=False, extra=extra_row, teacher_model=target.model, endpoint=endpoint,
        )
        if self.metrics is not None:
            total_s = time.perf_counter() - t0
            self.metrics.observe_exchange(route.name, "teacher", total_s, cost, cost, usage)
            if on_answer is None and extra_row is None:  # plain proxying: no student time inside
                self.metrics.observe_overhead(total_s - upstream_s)
        return Reply(body=resp.raw if resp.raw is not None else orjson.dumps(resp.body), headers=headers, native=resp.native)

    async def _teacher_answer(self, target: TeacherTarget, upstream: dict[str, Any], surface: SurfaceCall | None) -> TeacherResponse:
        """The teacher's answer: on the request's own surface when ``target`` speaks it (``body``
        then holds its chat form and ``raw`` the native bytes), otherwise as a chat completion."""

        async def native() -> TeacherResponse:
            assert surface is not None
            answer = await self.teacher.native(target, surface.name, surface.native_body)
            return TeacherResponse(body=surface.to_chat(answer.body), raw=answer.raw, headers=answer.headers, native=True)

        return await self._on_surface(target, surface, native, lambda: self.teacher.chat(target, upstream))

    async def _open_stream(self, target: TeacherTarget, upstream: dict[str, Any], surface: SurfaceCall | None) -> TeacherStream:
        """Open the teacher's stream, natively on the request's surface where ``target`` speaks it."""

        async def native() -> TeacherStream:
            assert surface is not None
            stream = await self.teacher.native_stream(target, surface.name, {**surface.native_body, "stream": True})
            stream.native = True
            return stream

        return await self._on_surface(target, surface, native, lambda: self.teacher.chat_stream(target, upstream))

    async def _on_surface(self, target: TeacherTarget, surface: SurfaceCall | None, native: Callable[[], Awaitable[Any]],
                          chat: Callable[[], Awaitable[Any]]) -> Any:
        """``native()`` when ``target`` speaks the request's surface, else ``chat()``; an upstream that
        answers the native path 404/405 (an OpenAI-compatible server without it) gets ``chat()``, and
        the teacher client remembers not to try that path on it again."""
        if surface is None or not self.teacher.speaks(target, surface.name):
            return await chat()
        try:
            return await native()
        except UpstreamStatus as exc:
            if exc.status not in (404, 405):
                raise
        answer = await chat()
        self.teacher.not_native(target, surface.name)
        return answer

    async def _teacher_stream(
        self,
        route: Route,
        body: dict[str, Any],
        upstream: dict[str, Any],
        principal: Principal,
        uid: str,
        ts: float,
        t0: float,
        headers: dict[str, str],
        extra_row: dict[str, Any] | None,
        on_answer: Any = None,
        *,
        surface: SurfaceCall | None = None,
    ) -> Reply:
        so = body.get("stream_options") or {}
        client_wants_usage = bool(so.get("include_usage"))
        # The ledger needs usage to price the answer, so ask for it and drop it again if the client did not.
        upstream["stream_options"] = {**so, "include_usage": True}
        target, stream = await self._with_fallbacks(route, lambda t: self._open_stream(t, upstream, surface))
        if target is not route.teacher:
            headers["x-kdgate-teacher"] = target.model
        if stream.native:
            return self._native_stream(route, body, stream, surface, principal, uid, ts, t0, headers, extra_row,
                                       on_answer, target)
        endpoint = _endpoint(surface)

        async def events() -> AsyncIterator[bytes]:
            chunks: list[dict[str, Any]] = []
            error: GatewayError | None = None
            try:
                async for event in stream:
                    if not event.startswith(b"data:"):
                        if event.startswith(b":"):  # an SSE comment (keep-alive): pass it on
                            yield event
                            continue
                        raise UpstreamError("The teacher sent a malformed stream event.")
                    payload = event[5:].strip()
                    if payload and payload != b"[DONE]":
                        try:
                            chunk = orjson.loads(payload)
                        except orjson.JSONDecodeError:
                            raise UpstreamError("The teacher sent a malformed stream event.") from None
                        if isinstance(chunk, dict) and chunk.get("error"):
                            raise UpstreamError(f"The teacher's stream failed: {str(chunk['error'])[:200]}")
                        chunks.append(chunk)
                        if not client_wants_usage and chunk.get("usage") and not chunk.get("choices"):
                            continue
                        if not client_wants_usage and chunk.get("usage"):
                            chunk = {k: v for k, v in chunk.items() if k != "usage"}
                            event = b"data: " + orjson.dumps(chunk) + b"\n\n"
                    yield event
            except GatewayError as exc:
                error = exc
                # the status line is gone: tell the client in-band, as OpenAI does
                yield b"data: " + orjson.dumps(exc.body()) + b"\n\n"
            finally:
                await stream.aclose()
                await self._stream_done(route, body, principal, uid, ts, t0, assemble_stream(chunks), error, extra_row,
                                        on_answer, target, endpoint)

        return Reply(stream=events(), headers=headers)

    def _native_stream(
        self, route: Route, body: dict[str, Any], stream: TeacherStream, surface: SurfaceCall, principal: Principal,
        uid: str, ts: float, t0: float, headers: dict[str, str], extra_row: dict[str, Any] | None, on_answer: Any,
        target: TeacherTarget,
    ) -> Reply:
        """A native teacher's stream on the request's surface: its events pass through as they come;
        the ledger gets the answer they amount to, in chat form."""

        async def events() -> AsyncIterator[bytes]:
            parsed: list[dict[str, Any]] = []
            error: GatewayError | None = None
            try:
                async for event in stream:
                    payload = sse_data(event)
                    if payload and payload != b"[DONE]":
                        try:
                            value = orjson.loads(payload)
                        except orjson.JSONDecodeError:
                            raise UpstreamError("The teacher sent a malformed stream event.") from None
                        if isinstance(value, dict):
                            parsed.append(value)
                            if value.get("type") in ("error", "response.failed") or (value.get("error") and not value.get("type")):
                                error = UpstreamError(f"The teacher's stream failed: {str(value.get('error'))[:200]}")
                    yield event
            except GatewayError as exc:
                error = exc
                yield _in_band_error(surface.name, exc)
            finally:
                await stream.aclose()
                native = surface.assemble(parsed) if error is None else None
                response = surface.to_chat(native) if native else {"choices": [], "usage": None}
                await self._stream_done(route, body, principal, uid, ts, t0, response, error, extra_row, on_answer,
                                        target, surface.name)

        return Reply(stream=events(), headers=headers, native=True)

    async def _stream_done(
        self, route: Route, body: dict[str, Any], principal: Principal, uid: str, ts: float, t0: float,
        response: dict[str, Any], error: GatewayError | None, extra_row: dict[str, Any] | None, on_answer: Any,
        target: TeacherTarget, endpoint: str,
    ) -> None:
        """A teacher stream has ended (``response``: what it amounted to, in chat form): price it,
        let ``on_answer`` score it, and log it."""
        if error is None and not response["choices"]:
            error = UpstreamError("The teacher's stream ended without an answer.")
        usage = Usage.from_openai(response.get("usage"))
        cost = self.money.teacher_cost(target.model, usage)
        extra = dict(extra_row or {})
        if on_answer is not None and error is None:
            extra.update(await on_answer(answer_of(response)[0]) or {})
        self._log_teacher(
            uid=uid, ts=ts, t0=t0, route=route, body=body, principal=principal, response=response,
            usage=usage, cost=cost, stream=True, extra=extra, error=error, teacher_model=target.model, endpoint=endpoint,
        )
        if self.metrics is not None:
            self.metrics.observe_exchange(route.name, "teacher", time.perf_counter() - t0, cost, cost, usage)

    async def _with_fallbacks(self, route: Route, call: Any) -> tuple[TeacherTarget, Any]:
        """Call the route's teacher, then its fallback teachers in order while the failure is an outage."""
        from gateway.teacher import _is_outage

        targets = [route.teacher, *route.fallbacks]
        for i, target in enumerate(targets):
            try:
                return target, await call(target)
            except GatewayError as exc:
                if i == len(targets) - 1 or not _is_outage(exc):
                    raise
                log.warning("route %s: teacher %s failed (%s); trying fallback %s", route.name, target.model, exc.status, targets[i + 1].model)
        raise AssertionError("unreachable")

    async def _off_loop(self, fn: Any, *args: Any) -> None:
        """Run a limits step: inline when it only touches memory, on a thread when it asks the
        store (shared limits on PostgreSQL), so the event loop never waits on the database."""
        if self.limiter is not None and getattr(self.limiter, "blocking", False) and self._limited(args[0]):
            await asyncio.to_thread(fn, *args)
        else:
            fn(*args)

    @staticmethod
    def _limited(principal: Principal) -> bool:
        return bool(principal.limits) and bool(principal.key_id) and not principal.admin

    def _check_limits(self, principal: Principal, body: dict[str, Any]) -> None:
        if self.limiter is None or not principal.limits:
            return
        est = 0
        if principal.limits.get("tpm"):
            est = estimate_prompt_tokens(body) + (requested_output_tokens(body) or 0)
        self.limiter.check(principal, est_tokens=est)

    def _reserve_budget(self, principal: Principal, route: Route, body: dict[str, Any], uid: str) -> None:
        """Hold the request's maximum cost against the key's budgets (released when its row is
        recorded). A teacher without a known price cannot be budgeted: refused for keys with one."""
        if self.limiter is None or not self.limiter.has_budget(principal):
            return
        prompt = estimate_prompt_tokens(body)
        worst = 0.0
        for target in (route.teacher, *route.fallbacks):
            if not self.money.known(target.model):
                raise PermissionDenied(
                    f"The teacher {target.model} has no known price, so this key's budget cannot be kept. "
                    f"The operator can set price_overrides.\"{target.model}\".",
                    code="model_price_unknown",
                )
            worst = max(worst, self.money.max_cost(target.model, prompt_tokens=prompt, completion_tokens=requested_output_tokens(body),
                                                   n=int(body.get("n") or 1)))
        self.limiter.reserve(principal, uid, worst)

    def record(self, row: dict[str, Any]) -> None:
        """Every ledger row of an exchange goes through here: the key's usage is counted (and its
        budget reservation released), then it is queued. A row of a request on another surface
        (recorded while that request is served: the student's) gets that surface as its endpoint."""
        surface = _SURFACE.get()
        if surface is not None and row.get("endpoint") == "chat.completions":
            row["endpoint"] = surface.name
        if self.limiter is not None and row.get("key_id") and not getattr(self.limiter, "blocking", False):
            self.limiter.record(
                row["key_id"], tokens=(row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0),
                cost=row.get("cost_usd") or 0.0, uid=row.get("uid"),
            )
        self.writer.submit(row)
        if self.limiter is not None and row.get("key_id") and getattr(self.limiter, "blocking", False):
            tokens = (row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0)
            if tokens and self.limiter.counts_tokens(row["key_id"]):
                self._spawn_blocking(self.limiter.record, row["key_id"], tokens=tokens, cost=0.0, uid=row.get("uid"))

    def _spawn_blocking(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run a store write in the background (tokens per minute; never on the event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            fn(*args, **kwargs)
            return
        task = loop.run_in_executor(None, lambda: fn(*args, **kwargs))
        task.add_done_callback(lambda f: f.exception() and log.warning("limits: %s", f.exception()))

    # -- embeddings -----------------------------------------------------------------------
    async def embeddings(self, body: dict[str, Any], *, principal: Principal, headers: dict[str, str]) -> Reply:
        t0 = time.perf_counter()
        ts = time.time()
        uid = new_uid()
        route: Route | None = None
        try:
            validate_embeddings(body)
            upstream, ignored = teacher_body(body, surface="embeddings", params=self.params)
            await self._off_loop(self._check_limits, principal, body)
            route = self.routes.resolve(body, headers.get("x-kdgate-route"), uid, principal=principal)
            target = TeacherTarget(model=self.routes.teacher_for(body["model"]), api_base=route.teacher.api_base)
            await self._off_loop(self._reserve_budget, principal, route, body, uid)
            resp = await self.teacher.embeddings(target, upstream)
        except GatewayError as exc:
            self._log_failure(uid=uid, ts=ts, t0=t0, route=route, body=body, principal=principal, exc=exc, endpoint="embeddings")
            raise
        usage = Usage.from_openai(resp.body.get("usage"))
        cost = self.money.teacher_cost(target.model, usage)
        summary = {k: v for k, v in resp.body.items() if k != "data"}
        summary["data_count"] = len(resp.body.get("data") or [])
        self.record(
            {
                "uid": uid, "ts": ts, "route": route.name, "key_id": principal.key_id, "endpoint": "embeddings",
                "model": body.get("model"), "teacher_model": target.model, "request": _logged_request(body),
                "response": orjson.dumps(summary).decode(), "prompt_tokens": usage.prompt_tokens,
                "cost_usd": cost, "counterfactual_usd": cost, "latency_ms": (time.perf_counter() - t0) * 1000,
                "status": 200, "served_by": "teacher", "stream": 0,
            }
        )
        return Reply(
            body=resp.raw if resp.raw is not None else orjson.dumps(resp.body),
            headers={"x-kdgate-route": route.name, "x-kdgate-served-by": "teacher", "x-kdgate-cost-usd": format_usd(cost),
                     "x-request-id": uid, **ignored},
        )

    # -- ledger rows ----------------------------------------------------------------------
    def _log_teacher(
        self,
        *,
        uid: str,
        ts: float,
        t0: float,
        route: Route,
        body: dict[str, Any],
        principal: Principal,
        response: dict[str, Any],
        usage: Usage,
        cost: float,
        stream: bool,
        extra: dict[str, Any] | None = None,
        error: GatewayError | None = None,
        teacher_model: str | None = None,
        endpoint: str = "chat.completions",
    ) -> None:
        answer, finish, logprobs = answer_of(response)
        row = {
            "uid": uid, "ts": ts, "route": route.name, "key_id": principal.key_id, "endpoint": endpoint,
            "model": body.get("model"), "teacher_model": teacher_model or route.teacher.model, "request": _logged_request(body),
            "response": orjson.dumps(response).decode(), "answer": answer, "finish_reason": finish,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens, "reasoning_tokens": usage.reasoning_tokens,
            "cost_usd": cost, "counterfactual_usd": cost, "latency_ms": (time.perf_counter() - t0) * 1000,
            "status": error.status if error else 200, "error": error.message if error else None,
            "served_by": "teacher", "teacher_logprobs": orjson.dumps(logprobs).decode() if logprobs else None,
            "stream": int(stream),
        }
        if extra:
            row.update(extra)
        self.record(row)

    def _log_failure(
        self,
        *,
        uid: str,
        ts: float,
        t0: float,
        route: Route | None,
        body: Any,
        principal: Principal,
        exc: GatewayError,
        endpoint: str,
    ) -> None:
        try:
            request = _logged_request(body) if isinstance(body, dict) else None
        except TypeError:
            request = None
        exc.request_id = uid  # the error reply's x-request-id names this row
        if route is not None:
            self.routes.forget(uid)  # a failed request teaches no template
        self.record(
            {
                "uid": uid, "ts": ts, "route": route.name if route else "(unrouted)", "key_id": principal.key_id,
                "endpoint": endpoint, "model": body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None,
                "teacher_model": route.teacher.model if route else None, "request": request,
                "latency_ms": (time.perf_counter() - t0) * 1000, "status": exc.status, "error": exc.message,
                "served_by": "teacher" if route else "gateway", "cost_usd": 0.0, "counterfactual_usd": 0.0,
                "stream": int(bool(isinstance(body, dict) and body.get("stream"))),
            }
        )
        if self.metrics is not None:
            self.metrics.observe_error(route.name if route else "(unrouted)", exc.status)


def _in_band_error(surface: str, exc: GatewayError) -> bytes:
    """A failure after the status line, in the surface's own stream format."""
    if surface == "messages":
        from gateway.surfaces.messages import error_body

        return b"event: error\ndata: " + orjson.dumps(error_body(exc)) + b"\n\n"
    if surface == "responses":
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "code": exc.code or "server_error",
                                                         "message": exc.message, "param": exc.param}) + b"\n\n"
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"
