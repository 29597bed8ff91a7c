"""The cost-savings dashboard: the page, its wiring into the app, and ``/metrics``.

``install_dashboard(app)`` adds everything to an app built by ``create_app``:

- ``GET /dashboard`` (and ``/dashboard/routes/{name}``): a login form until the admin key is given,
  then the page. The key is exchanged for a session (:mod:`gateway.sessions`), sent as a
  ``Secure; HttpOnly; SameSite=Strict`` cookie; the key never appears in a URL or in the page.
- the admin endpoints the page reads and writes (:mod:`gateway.dashboard_api`), each behind the
  admin key, documented in ``/openapi.json``;
- ``GET /metrics``: Prometheus text format, from the app's own registry (:mod:`gateway.metrics`);
- ``/dashboard/static/*``: the page's script, style and SVG charts, all served from this package;
- a background task that keeps the stats rollups current and feeds distiller runs into the metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import RedirectResponse, Response

from gateway.admin import CSRF_HEADER, admin_principal
from gateway.dashboard_api import build_stats_router
from gateway.errors import GatewayError, NotFound
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics
from gateway.sessions import SESSION_COOKIE, LoginThrottle, SessionStore
from gateway.stats import Stats

log = logging.getLogger(__name__)

__all__ = ["install_dashboard", "SessionStore", "SESSION_COOKIE", "CSRF_HEADER"]

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_PAGE_HEADERS = {
    "content-security-policy": _CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # "no-referrer" would make form posts send Origin: null
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


# -- helpers ------------------------------------------------------------------------------
def _state(request: Request) -> Any:
    return request.app.state.kdgate


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _page(name: str, **values: str) -> str:
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return text


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="text/html; charset=utf-8", headers={**_PAGE_HEADERS, **(headers or {})})


# -- the page ---------------------------------------------------------------------------------
def build_dashboard_router() -> APIRouter:
    """The page itself: login, logout, the app shell and its static files."""
    router = APIRouter(tags=["dashboard"])

    def shell_or_login(request: Request) -> Response:
        session = request.app.state.sessions.session_of(request)
        if session is None:
            return _html(_page("login.html", ERROR=""))
        return _html(_page("index.html", CSRF=session.csrf))

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        """The overview page (or the login form without a session)."""
        return shell_or_login(request)

    @router.get("/dashboard/routes/{name}", include_in_schema=False)
    async def dashboard_route(request: Request, name: str) -> Response:
        """A route's page (or the login form without a session)."""
        return shell_or_login(request)

    @router.post("/dashboard/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """Exchange the admin key (form field ``key``) for a session cookie."""
        if not _same_origin(request):
            return _html(_page("login.html", ERROR="Cross-site login refused."), 403)
        throttle: LoginThrottle = request.app.state.login_throttle
        client = request.client.host if request.client else "?"
        wait = throttle.retry_after(client)
        if wait is not None:
            log.warning("dashboard login throttled for %s", client)
            return _html(_page("login.html", ERROR=f"Too many failed logins; try again in {wait} s."), 429,
                         {"retry-after": str(wait)})
        body = (await request.body())[:10_000].decode("utf-8", "replace")
        key = (parse_qs(body).get("key") or [""])[0].strip()
        try:
            admin_principal_for_key(request, key)
        except GatewayError as exc:
            throttle.failed(client)
            log.info("dashboard login refused: %s", exc.message)
            return _html(_page("login.html", ERROR=exc.message), exc.status)
        session = request.app.state.sessions.create(key)
        response = RedirectResponse("/dashboard", status_code=303, headers=_PAGE_HEADERS)
        response.set_cookie(
            SESSION_COOKIE, session.sid, max_age=int(request.app.state.sessions.ttl_s), path="/",
            secure=True, httponly=True, samesite="strict",
        )
        return response

    @router.post("/dashboard/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        """End the session (needs the CSRF header, or the form field ``csrf``)."""
        sessions: SessionStore = request.app.state.sessions
        session = sessions.session_of(request)
        if session is not None:
            sent = request.headers.get(CSRF_HEADER) or (parse_qs((await request.body()).decode("utf-8", "replace")).get("csrf") or [""])[0]
            if hmac.compare_digest(sent.encode(), session.csrf.encode()):
                sessions.drop(session.sid)
        response = RedirectResponse("/dashboard", status_code=303, headers=_PAGE_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        """The page's own assets (no CDN: the page works offline)."""
        path = STATIC_DIR / name
        kind = _STATIC_TYPES.get(path.suffix)
        if kind is None or "/" in name or name.startswith(".") or not path.is_file() or path.suffix == ".html":
            raise NotFound(f"No dashboard asset {name!r}.")
        return Response(path.read_bytes(), media_type=kind, headers={"x-content-type-options": "nosniff", "cache-control": "no-cache"})

    @router.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: requests, escalations, latency, tokens, cost, savings, distiller, queue
        (behind the admin key when ``ops_auth`` is on)."""
        state = getattr(request.app.state, "kdgate", None)
        if state is not None and state.settings.ops_auth:
            admin_principal(request)
        return Response(metrics_of(request.app).render(), media_type=CONTENT_TYPE_LATEST)

    return router


def admin_principal_for_key(request: Request, key: str) -> Any:
    """Check a key as the admin key (401 wrong key, 403 a gateway key)."""
    return _state(request).keys.admin_principal(key or None)


# -- wiring ---------------------------------------------------------------------------------------
def metrics_of(app: FastAPI) -> Metrics:
    """The metrics the serving path reports to: the gateway state's, else the dashboard's own."""
    state = getattr(app.state, "kdgate", None)
    found = getattr(state, "metrics", None) if state is not None else None
    return found if isinstance(found, Metrics) else app.state.metrics


def install_dashboard(app: FastAPI, *, refresh_every_s: float = 5.0) -> None:
    """Add the dashboard, its admin endpoints, ``/metrics`` and ``app.state.sessions`` to ``app``.

    Idempotent. Wraps the app's lifespan so that, once the gateway state exists, the serving path
    reports to this app's :class:`Metrics` (unless ``state.metrics`` is already set), the queue-depth
    gauge reads the ledger writer, and a background task keeps the stats rollups current.
    """
    if getattr(app.state, "dashboard_installed", False):
        return
    app.state.dashboard_installed = True
    app.state.sessions = SessionStore()
    app.state.login_throttle = LoginThrottle()
    app.state.metrics = Metrics()
    app.state.stats = None
    app.include_router(build_dashboard_router())
    app.include_router(build_stats_router())

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as value:
            refresher = _attach(a, refresh_every_s)
            try:
                yield value
            finally:
                if refresher is not None:
                    refresher.cancel()
                    try:
                        await refresher
                    except (asyncio.CancelledError, Exception):
                        pass

    app.router.lifespan_context = lifespan


def _attach(app: FastAPI, refresh_every_s: float) -> asyncio.Task | None:
    state = getattr(app.state, "kdgate", None)
    if state is None:
        return None
    metrics: Metrics = app.state.metrics
    if not isinstance(state.metrics, Metrics):
        if state.metrics is None:
            state.metrics = metrics
    for part in (state.chat, state.students):  # the serving path and the student router report here
        if part is not None and getattr(part, "metrics", None) is None:
            part.metrics = state.metrics
    app.state.login_throttle = LoginThrottle(state.settings.login_attempts_per_minute)
    admin_key = state.settings.admin_key.get_secret_value() if state.settings.admin_key else None
    app.state.sessions.bind(state.ledger, admin_key)
    writer = state.writer
    metrics_of(app).set_queue_depth(lambda: writer.depth)
    stats = app.state.stats = Stats(state.ledger)
    runs = app.state.distiller_runs = DistillerRunTail(state.ledger, metrics_of(app))
    if refresh_every_s <= 0:
        return None

    def tick() -> None:
        stats.refresh()
        runs.poll()

    async def refresh_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(tick)
            except Exception:
                log.warning("stats rollup refresh failed; will retry", exc_info=True)
            await asyncio.sleep(refresh_every_s)

    return asyncio.get_running_loop().create_task(refresh_forever(), name="kdgate-stats-refresh")


class DistillerRunTail:
    """Feeds the distiller's runs into the gateway's metrics.

    The distiller is another process, so it cannot touch this process's counters; it records each
    run in the ledger as a ``distill.run`` route event (detail: ``seconds``, ``ok``), and this tail
    reads the events written since the gateway started (counters start at zero with the process,
    as Prometheus expects).
    """

    KIND = "distill.run"

    def __init__(self, ledger: Any, metrics: Metrics):
        self.ledger = ledger
        self.metrics = metrics
        self.last_id = ledger.max_event_id()
        self._lock = threading.Lock()

    def poll(self) -> int:
        """Observe the runs recorded since the last poll; returns how many."""
        with self._lock:
            return self._poll()

    def _poll(self) -> int:
        rows = self.ledger.events_since(self.last_id, self.KIND)
        for row in rows:
            self.last_id = max(self.last_id, int(row["id"]))
            try:
                detail = row["detail"]
                seconds = float(detail.get("seconds", 0.0))
                ok = bool(detail.get("ok", detail.get("status") != "failed"))
            except (ValueError, TypeError, AttributeError):
                log.debug("unreadable distill.run event %s", row["id"])
                continue
            self.metrics.observe_distiller_run(row["route"], seconds, ok)
        return len(rows)
