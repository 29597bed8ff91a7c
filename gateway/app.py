"""The FastAPI application: ``create_app(settings)`` builds it; nothing happens at import time."""

from __future__ import annotations


import asyncio
import gc
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.auth import KeyStore
from gateway.money import Money, PriceBook
from gateway.errors import BadRequest, GatewayError, error_body
from store import Ledger, LedgerWriter
from gateway.routing import RouteTable
from gateway.serving import ChatService, new_uid
from gateway.settings import Settings
from gateway.teacher import TeacherClient

log = logging.getLogger(__name__)

__all__ = ["create_app", "GatewayState"]


@dataclass
class GatewayState:
    settings: Settings
    ledger: Ledger
    writer: LedgerWriter
    keys: KeyStore
    routes: RouteTable
    teacher: TeacherClient
    money: Money
    chat: ChatService
    surfaces: Any = None  # gateway.surface_serving.SurfaceService
    students: Any = None
    metrics: Any = None
    distiller: Any = None


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


STORE_POLL_S = 1.0


async def follow_store(state: "GatewayState", *, seen: dict[str, int], every_s: float = STORE_POLL_S) -> None:
    """Keep this process's copies of routes and keys in step with the store: any change made by
    another process (``kdgate routes set``, the CLI's ``keys`` commands, another replica, the
    distiller) bumps a generation counter, and a moved counter reloads what it counts. One small
    query a second; reloads happen off the event loop."""
    while True:
        await asyncio.sleep(every_s)
        try:
            now = await asyncio.to_thread(state.ledger.generations)
            if now.get("routes") != seen.get("routes"):
                await asyncio.to_thread(state.routes.reload)
                if state.students is not None:
                    state.students.routes_reloaded()
            if now.get("keys") != seen.get("keys"):
                state.keys.invalidate()
            if now.get("students") != seen.get("students") and state.students is not None:
                await state.students.refresh()
            seen = now
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not follow the store's changes; will retry", exc_info=True)


def _freeze_startup_objects() -> None:
    """Move everything alive at startup (the imported libraries, those a student load needs included,
    and litellm's price map: about 310k tracked objects without the student libraries) out of the
    garbage collector's reach.

    A full collection walks every tracked object: with these loaded it took 115-135 ms on this
    machine, found nothing to free, and under load came every 0.7 s, stalling the event loop; at
    concurrency 32 the 99th percentile was about 170 ms against a 12 ms median. Frozen objects are
    never collected as cycles (reference counting still frees them), which is right for modules and
    startup state that live as long as the process.
    """
    gc.collect()
    gc.freeze()
    log.debug("froze %d startup objects out of the garbage collector", gc.get_freeze_count())


def create_app(settings: Settings) -> FastAPI:
    """Build the gateway. Clients, the ledger writer and the students start in the lifespan."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = build_state(settings)
        app.state.kdgate = state
        state.writer.start()
        await state.teacher.start()
        if state.students is not None:
            await state.students.start()
        if state.distiller is not None:
            state.distiller.start()
        # The teacher's prices: the first lookup loads litellm's price map (most of the objects
        # frozen below); loaded here, it is not paid by the first request nor left to the collector.
        state.money.prices.prices(settings.teacher)
        if state.students is not None and settings.student_backend == "embedded":
            from router.embedding import prepare_serving_process

            # what the first student load would import, and oneDNN off (the student path's memory)
            runtime = await asyncio.to_thread(prepare_serving_process, settings.student_encoder_runtime)
            log.info("student encoders run on %s", "ONNX Runtime" if runtime == "onnx" else "PyTorch")
        _freeze_startup_objects()
        follower = asyncio.get_running_loop().create_task(
            follow_store(state, seen=state.ledger.generations()), name="kdgate-follow-store")
        log.info("kdgate ready: teacher %s, ledger %s", settings.teacher, state.ledger.describe())
        try:
            yield
        finally:
            follower.cancel()
            if state.distiller is not None:
                state.distiller.stop()
            if state.students is not None:
                await state.students.close()
            await state.teacher.close()
            state.writer.close()
            state.ledger.close()

    app = FastAPI(
        title="kdgate",
        version="0.1.0",
        description="OpenAI-compatible gateway that distils the teacher into students and routes by confidence.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(request, BadRequest(f"Invalid request: {first.get('msg', 'bad input')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"Unknown path {request.url.path}.", 405: f"Method {request.method} is not allowed on {request.url.path}."}.get(
            exc.status_code, str(exc.detail)
        )
        err = GatewayError(message, status=exc.status_code, headers=dict(getattr(exc, "headers", None) or {}))
        err.type = "invalid_request_error" if exc.status_code < 500 else "api_error"
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, GatewayError("The gateway hit an internal error; it has been logged."))

    def state_of(request: Request) -> GatewayState:
        return request.app.state.kdgate

    from gateway.api import build_api_router

    app.include_router(build_api_router())

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        """The process is up."""
        return _json(200, {"status": "ok"})

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> Response:
        """Ready to serve: the ledger writer runs, can write, and its queue is not full (rows would be
        dropped); a load balancer sends traffic elsewhere meanwhile.
        Behind the admin key when ``ops_auth`` is on; teacher endpoints are shown by host only."""
        state = state_of(request)
        if settings.ops_auth:
            from gateway.admin import admin_principal

            admin_principal(request)
        writer = state.writer
        writable = writer.failing_since is None
        ok = writer.alive and not writer.saturated and writable
        checks = {
            "ledger_writer": writer.alive,
            "ledger_writable": writable,  # false while the database cannot be written (rows wait in the queue)
            "ledger_queue_depth": writer.depth,
            "ledger_queue_max": writer.max_queue,
            "ledger_queue_bytes": writer.queued_bytes,
            "ledger_dropped": writer.dropped + writer.rejected,
            "ledger_failing_since": writer.failing_since,
            "teacher_circuits": {f"{k[0]}@{endpoint_host(k[1])}": b.state for k, b in state.teacher.breakers.items()},
        }
        return _json(200 if ok else 503, {"status": "ready" if ok else "not ready", "checks": checks},
                     None if ok else {"retry-after": "1"})

    from gateway.admin import build_admin_router

    app.include_router(build_admin_router())
    from gateway.dashboard import install_dashboard

    install_dashboard(app)
    if not settings.auth:
        app.add_middleware(LoopbackOnly)
    return app


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def _loopback(authority: str) -> bool:
    """``host[:port]`` names this machine's loopback interface."""
    host = authority.strip().lower()
    if host.startswith("["):
        host = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in _LOOPBACK_HOSTS


class LoopbackOnly:
    """Without auth (``--no-auth``, loopback only), every request must name a loopback host and come
    from no other site: a ``Host`` that is not 127.0.0.1/localhost/[::1] is a DNS-rebinding page in
    the operator's browser, and an ``Origin`` of another host is a cross-site request."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host, origin = "", None
            for k, v in scope.get("headers", ()):  # ASGI header names are lower-case bytes
                if k == b"host":
                    host = v.decode("latin-1")
                elif k == b"origin":
                    origin = v.decode("latin-1")
            problem = None
            if not _loopback(host):
                problem = "The gateway runs without auth and answers only requests to a loopback host (127.0.0.1, localhost, [::1])."
            elif origin is not None and origin != "null":
                from urllib.parse import urlsplit

                try:
                    netloc = urlsplit(origin).netloc
                except ValueError:
                    netloc = ""
                if not _loopback(netloc):
                    problem = "The gateway runs without auth and refuses requests sent by other web sites."
            if problem is not None:
                body = orjson.dumps(error_body(problem, type="permission_error", code="host_not_allowed"))
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def endpoint_host(base_url: str | None) -> str:
    """What of a teacher's base URL may be shown: its host and port, never a path, query or the
    credentials a URL can carry."""
    if not base_url:
        return "default"
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(base_url)
        host = parts.hostname or "?"
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "?"


def error_response(request: Request, exc: GatewayError) -> Response:
    """An error in the surface's own format (Anthropic's on ``/v1/messages``, OpenAI's elsewhere), with
    the ``x-request-id`` of its ledger row (a fresh one when the request never got a row) and, on
    every 429 and 503, a ``Retry-After`` (the error's own, or one second)."""
    headers = dict(exc.headers)
    headers["x-request-id"] = getattr(exc, "request_id", None) or new_uid()
    if exc.status in (429, 503) and not any(k.lower() == "retry-after" for k in headers):
        headers["retry-after"] = "1"
    if request.url.path.startswith("/v1/messages"):
        from gateway.surfaces.messages import error_body as anthropic_error

        headers["request-id"] = headers["x-request-id"]  # what Anthropic's SDKs read as request_id
        return _json(exc.status, anthropic_error(exc), headers)
    return _json(exc.status, exc.body(), headers)


def build_state(settings: Settings) -> GatewayState:
    ledger = Ledger(settings.db)
    writer = LedgerWriter(settings.db, flush_ms=settings.ledger_flush_ms, batch_size=settings.ledger_batch,
                          max_queue=settings.ledger_max_queue, max_queue_bytes=settings.ledger_max_queue_bytes)
    keys = KeyStore(
        ledger,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        enabled=settings.auth,
    )
    routes = RouteTable(settings, ledger, writer)
    teacher = TeacherClient(
        api_key=settings.teacher_api_key.get_secret_value() if settings.teacher_api_key else None,
        timeout_s=settings.teacher_timeout_s,
        retries=settings.teacher_retries,
        backoff_s=settings.retry_backoff_s,
        direct_http=settings.direct_http,
        breaker_failures=settings.breaker_failures,
        breaker_reset_s=settings.breaker_reset_s,
    )
    money = Money(PriceBook(settings.price_overrides), student_per_1k_tokens=settings.student_price_per_1k_tokens,
                  student_per_gpu_hour=settings.student_price_per_gpu_hour)
    from gateway.limits import Limiter, SharedLimiter
    from gateway.metrics import Metrics

    metrics = Metrics(queue_depth=lambda: writer.depth)
    from gateway.params import ParamPolicy

    chat = ChatService(routes=routes, teacher=teacher, money=money, writer=writer, limiter=SharedLimiter(ledger) if ledger.postgres else Limiter(ledger), metrics=metrics,
                       params=ParamPolicy(settings.teacher_extra_params))
    from gateway.surface_serving import SurfaceService

    state = GatewayState(
        settings=settings, ledger=ledger, writer=writer, keys=keys, routes=routes, teacher=teacher, money=money, chat=chat,
        metrics=metrics, surfaces=SurfaceService(chat, ledger, responses_ttl_s=settings.responses_ttl_days * 86400),
    )
    from gateway.students import StudentRouter

    state.students = chat.students = StudentRouter(
        settings=settings, ledger=ledger, writer=writer, routes=routes, chat=chat, money=money, metrics=metrics
    )
    if settings.embedded_distiller:
        state.distiller = DistillerProcess(settings)
    return state


class DistillerProcess:
    """The embedded distiller: ``python -m distiller.worker`` as a niced child of the gateway.

    A separate process rather than a thread, so training never holds the GIL the event loop needs.
    The gateway talks to it only through the ledger (it promotes; the gateway polls the registry).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: Any = None

    def start(self) -> None:
        import json
        import subprocess
        import sys

        import os

        # the ledger goes through the environment: a DSN's password on a command line is every user's
        cmd = [sys.executable, "-m", "distiller.worker", "--artifacts", str(self.settings.artifacts_path), "--nice", "10"]
        if self.settings.distiller:
            cmd += ["--config-json", json.dumps(self.settings.distiller)]
        env = {**os.environ, "KDGATE_DB": str(self.settings.db)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
        log.info("embedded distiller started (pid %d)", self.proc.pid)

    def stop(self, timeout: float = 30.0) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # the worker stops between steps on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
