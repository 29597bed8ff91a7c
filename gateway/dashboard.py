"""The cost-savings dashboard: login sessions, the page, its admin endpoints, and ``/metrics``.

``install_dashboard(app)`` adds everything to an app built by ``create_app``:

- ``GET /dashboard`` (and ``/dashboard/routes/{name}``): a login form until the admin key is given,
  then the page. The key is exchanged for a random session id held server-side in memory, sent as a
  ``Secure; HttpOnly; SameSite=Strict`` cookie; the key never appears in a URL or in the page.
- ``app.state.sessions`` (:class:`SessionStore`): ``token_for(request)`` gives ``admin_principal``
  the admin key of a valid session. State-changing calls (anything but GET/HEAD/OPTIONS) made with
  the cookie must also carry the session's CSRF token in ``x-kdgate-csrf``; the page reads it from
  a ``<meta>`` tag, which another site can neither read nor forge.
- ``/admin/overview``, ``/admin/routes-table``, ``/admin/routes/{name}/curve|preview|versions|
  exchanges``, ``POST /admin/routes/{name}/promote|rollback/{version}``: the page's data, each behind
  the admin key, documented in ``/openapi.json``. Mode and threshold changes go through the existing
  ``PATCH /admin/routes/{name}``.
- ``GET /metrics``: Prometheus text format, from the app's own registry (:mod:`gateway.metrics`).
- ``/dashboard/static/*``: the page's script, style and SVG charts, all served from this package.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import RedirectResponse, Response

from gateway.admin import CSRF_HEADER, admin_principal
from gateway.errors import BadRequest, GatewayError, NotFound, UnknownRoute
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics
from gateway.stats import Stats, parse_since

log = logging.getLogger(__name__)

__all__ = ["install_dashboard", "SessionStore", "SESSION_COOKIE", "CSRF_HEADER"]

SESSION_COOKIE = "kdgate_session"
STATIC_DIR = Path(__file__).parent / "static"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
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


# -- sessions ---------------------------------------------------------------------------------
@dataclass
class Session:
    sid: str
    csrf: str
    token: str
    expires: float


class SessionStore:
    """Dashboard sessions: random ids held in this process's memory, each with an expiry.

    A restart logs everyone out (by design: nothing about a session is written anywhere). An id
    not issued here, or expired, or logged out, gets nothing.
    """

    def __init__(self, *, ttl_s: float = 8 * 3600, max_sessions: int = 1000):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, token: str) -> Session:
        """A new session for a caller who proved the admin key ``token``."""
        now = time.time()
        session = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), token=token, expires=now + self.ttl_s)
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            while len(self._sessions) >= self.max_sessions:  # drop the oldest
                self._sessions.pop(min(self._sessions, key=lambda k: self._sessions[k].expires))
            self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id, or None."""
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if session.expires <= time.time():
                del self._sessions[sid]
                return None
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def session_of(self, request: Request) -> Session | None:
        return self.get(request.cookies.get(SESSION_COOKIE))

    def token_for(self, request: Request) -> str | None:
        """The admin key behind the request's session cookie, or None.

        For a state-changing method the CSRF header must match the session's token too; without it
        the cookie counts for nothing (so the caller sees 401, as with no credentials at all).
        """
        session = self.session_of(request)
        if session is None:
            return None
        if request.method.upper() not in _SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                log.info("refused a %s %s with a session cookie but no valid CSRF token", request.method, request.url.path)
                return None
        return session.token


class LoginThrottle:
    """Failed dashboard logins per client address: past ``per_minute`` in the last minute, further
    attempts are refused (429) until the oldest failure is a minute old, right key or not."""

    def __init__(self, per_minute: int = 10, *, max_clients: int = 10_000):
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if now - t < 60.0]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.per_minute:
                return None
            return max(1, int(60.0 - (now - times[0])) + 1)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self.max_clients and client not in self._failures:
                self._failures.pop(next(iter(self._failures)))
            self._recent(client, now)
            self._failures.setdefault(client, []).append(now)


# -- API models (documented in /openapi.json) ------------------------------------------------
class Totals(BaseModel):
    requests: int
    student: int = Field(description="answers served by a student (status 200)")
    escalated: int = Field(description="requests the student was asked first and the teacher answered")
    errors: int
    student_share: float | None = Field(description="student / requests")
    teacher_only_usd: float = Field(description="what the teacher alone would have cost (sum of counterfactual_usd)")
    actual_usd: float = Field(description="exchanges' cost_usd plus shadow checks' cost_usd")
    saved_usd: float
    prompt_tokens: int
    completion_tokens: int
    shadow_checks: int
    live_agreement: float | None


class Saved(BaseModel):
    total: float
    today: float = Field(description="since 00:00 UTC")
    month: float = Field(description="since the first of the month, UTC")


class SeriesPoint(BaseModel):
    t: int = Field(description="bucket start, unix seconds (UTC)")
    requests: int
    student: int
    escalated: int
    student_share: float | None
    teacher_only_usd: float
    actual_usd: float
    saved_usd: float


class Overview(BaseModel):
    bucket: Literal["hour", "day"]
    since: float | None
    now: float
    totals: Totals = Field(description="all time")
    range: Totals = Field(description="since `since`")
    saved: Saved
    series: list[SeriesPoint]


class RouteRow(BaseModel):
    route: str
    requests: int
    student_share: float | None
    escalation_rate: float | None = Field(description="escalations / (student answers + escalations)")
    validation_agreement: float | None = Field(description="the live version's agreement on held-back pairs")
    live_agreement: float | None = Field(description="the live version's agreement on shadow checks")
    shadow_checks: int
    student_p50_ms: float | None
    student_p95_ms: float | None
    teacher_p50_ms: float | None
    teacher_p95_ms: float | None
    live_version: int | None
    student_kind: str | None
    mode: str | None
    threshold: float | None = Field(description="the route's own threshold setting (None: derived from the target)")
    target_agreement: float | None
    teacher_only_usd: float
    actual_usd: float
    saved_usd: float
    errors: int


class CurvePoint(BaseModel):
    threshold: float
    coverage: float
    agreement: float


class Expected(BaseModel):
    coverage: float = Field(description="share of traffic the student would serve")
    agreement: float = Field(description="expected agreement with the teacher on what it serves")


class CurveOut(BaseModel):
    route: str
    version: int | None = Field(description="the live student version (None: no live student)")
    mode: str | None
    threshold_setting: float | None = Field(description="the route's own threshold, if set")
    target_agreement: float | None
    target_confidence: float | None = Field(description="the route's setting (None: 0.95)")
    effective_threshold: float | None = Field(description="the threshold in force (None: no answer reaches it)")
    expected: Expected | None
    curve: list[CurvePoint] = Field(description="highest threshold first")


class PreviewOut(BaseModel):
    route: str
    version: int | None
    threshold: float | None = Field(description="the threshold asked for, or the one the target leads to")
    target_agreement: float | None
    reachable: bool = Field(description="False when no threshold reaches the target agreement")
    coverage: float
    agreement: float


class VersionOut(BaseModel):
    version: int
    kind: str | None
    status: str | None
    created: float | None
    train_pairs: int | None
    val_pairs: int | None
    metrics: dict[str, Any]
    shadow_checks: int
    live_agreement: float | None


class ShadowOut(BaseModel):
    student_answer: str | None
    teacher_answer: str | None
    agree: bool


class ExchangeOut(BaseModel):
    uid: str
    ts: float
    served_by: str | None
    status: int | None
    latency_ms: float | None
    cost_usd: float | None
    counterfactual_usd: float | None
    student_version: int | None
    confidence: float | None
    prompt: str = Field(description="the last user message (plain text: render it as text)")
    answer: str | None
    error: str | None
    shadow: ShadowOut | None


class PromoteOut(BaseModel):
    route: str
    version: int
    status: str
    action: Literal["promote", "rollback"]


# -- helpers ------------------------------------------------------------------------------
def _state(request: Request) -> Any:
    return request.app.state.kdgate


def stats_of(request: Request) -> Stats:
    """The app's :class:`Stats`, made on first use (the ledger exists only once the app started)."""
    app_state = request.app.state
    state = _state(request)
    stats = getattr(app_state, "stats", None)
    if stats is None or stats.ledger is not state.ledger:
        stats = app_state.stats = Stats(state.ledger)
    return stats


def _since(value: str | None, default: float | None) -> float | None:
    try:
        return parse_since(value, default=default)
    except ValueError as exc:
        raise BadRequest(str(exc), param="since") from None


def _route_or_404(request: Request, name: str) -> Any:
    route = _state(request).routes.get(name)
    if route is None:
        raise UnknownRoute(f"No route named {name!r}.", param="name")
    return route


def _route_settings(request: Request) -> dict[str, dict[str, Any]]:
    return {r.name: dict(r.settings) for r in _state(request).routes.all()}


def _notify_students(request: Request, name: str) -> None:
    students = _state(request).students
    if students is None:
        return
    for hook in ("version_changed", "settings_changed"):
        fn = getattr(students, hook, None)
        if fn is not None:
            fn(name)
            return


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


# -- routers -----------------------------------------------------------------------------------
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


def build_stats_router() -> APIRouter:
    """The admin endpoints the page reads and writes; each needs the admin key (or a session)."""
    router = APIRouter(prefix="/admin", tags=["admin"])

    @router.get("/overview", response_model=Overview)
    def overview(
        request: Request,
        bucket: Literal["hour", "day"] = "hour",
        since: str | None = Query(None, description="24h, 7d, 30d, all, a unix time or an ISO date (default 7d)"),
    ) -> dict[str, Any]:
        """Teacher-only vs actual spend, savings (total, today, month), student share, and a series."""
        admin_principal(request)
        return stats_of(request).overview(bucket=bucket, since=_since(since, time.time() - 7 * 86400))

    @router.get("/routes-table", response_model=list[RouteRow])
    def routes_table(
        request: Request,
        since: str | None = Query(None, description="24h, 7d, all, a unix time or an ISO date (default all)"),
        sort: str = Query("requests", description="a column of the table"),
        order: Literal["asc", "desc"] = "desc",
    ) -> list[dict[str, Any]]:
        """Per route: requests, student share, escalation rate, agreement, p50/p95 latency, version, mode, saving."""
        admin_principal(request)
        rows = stats_of(request).routes_table(since=_since(since, None), settings=_route_settings(request))
        if rows and sort not in rows[0]:
            raise BadRequest(f"Cannot sort by {sort!r}; use one of {', '.join(rows[0])}.", param="sort")
        present = [r for r in rows if r.get(sort) is not None]
        missing = [r for r in rows if r.get(sort) is None]
        present.sort(key=lambda r: r[sort], reverse=order == "desc")
        return present + missing

    @router.get("/routes/{name}/curve", response_model=CurveOut)
    def curve(request: Request, name: str) -> dict[str, Any]:
        """The live version's coverage/agreement curve, with the threshold in force and what it gives."""
        admin_principal(request)
        route = _route_or_404(request, name)
        from router.policy import NEVER, effective_threshold, expected_at

        version, points = stats_of(request).live_curve(name)
        settings = route.settings
        threshold = effective_threshold(settings, points) if points else None
        if threshold == NEVER:
            threshold = None
        expected = expected_at(points, threshold) if points and threshold is not None else None
        return {
            "route": name, "version": version, "mode": settings.get("mode"),
            "threshold_setting": settings.get("threshold"), "target_agreement": settings.get("target_agreement"),
            "target_confidence": settings.get("target_confidence"), "effective_threshold": threshold, "expected": expected, "curve": points,
        }

    @router.get("/routes/{name}/preview", response_model=PreviewOut)
    def preview(
        request: Request,
        name: str,
        threshold: float | None = Query(None, ge=0, le=1),
        target_agreement: float | None = Query(None, gt=0, le=1),
    ) -> dict[str, Any]:
        """What the live version's curve predicts for a threshold or a target agreement, before saving.

        A target is turned into a threshold as the router would turn it, with the route's
        ``target_confidence``."""
        admin_principal(request)
        route = _route_or_404(request, name)
        if (threshold is None) == (target_agreement is None):
            raise BadRequest("Give exactly one of threshold or target_agreement.", param="threshold")
        from router.policy import NEVER, effective_threshold, expected_at

        version, points = stats_of(request).live_curve(name)
        reachable = True
        if target_agreement is not None:
            settings = {"target_agreement": target_agreement, "target_confidence": route.settings.get("target_confidence")}
            found = effective_threshold(settings, points) if points else NEVER
            reachable = found != NEVER
            threshold = found if reachable else None
        expected = expected_at(points, threshold) if threshold is not None else {"coverage": 0.0, "agreement": 1.0}
        return {"route": name, "version": version, "threshold": threshold, "target_agreement": target_agreement,
                "reachable": reachable, **expected}

    @router.get("/routes/{name}/versions", response_model=list[VersionOut])
    def versions(request: Request, name: str) -> list[dict[str, Any]]:
        """Every student version of the route, newest first, with validation and live agreement."""
        admin_principal(request)
        _route_or_404(request, name)
        return stats_of(request).versions(name)

    def _set_live(request: Request, name: str, version: int, action: Literal["promote", "rollback"]) -> dict[str, Any]:
        who = admin_principal(request)
        _route_or_404(request, name)
        # The registry's rows are changed through the store API; the gateway never imports the
        # distiller. The artifact is verified first, as the distiller's own promotion does.
        from store import StudentRefused
        from router.artifact import verify_registered

        reason, event = ("dashboard", "student.promoted") if action == "promote" else ("rollback", "student.rollback")
        try:
            row = _state(request).ledger.set_live_student(name, version, actor=who.name, reason=reason, event=event,
                                                           verify=verify_registered)
        except StudentRefused as exc:
            raise GatewayError(str(exc), param="version", status=409) from None
        _notify_students(request, name)
        return {"route": name, "version": int(row["version"]), "status": row["status"], "action": action}

    @router.post("/routes/{name}/promote/{version}", response_model=PromoteOut)
    def promote(request: Request, name: str, version: int) -> dict[str, Any]:
        """Make a version live (its artifact is verified first); the previous live one is retired."""
        return _set_live(request, name, version, "promote")

    @router.post("/routes/{name}/rollback/{version}", response_model=PromoteOut)
    def rollback(request: Request, name: str, version: int) -> dict[str, Any]:
        """Put an earlier version back live (recorded as a rollback, with who and when)."""
        return _set_live(request, name, version, "rollback")

    @router.get("/routes/{name}/exchanges", response_model=list[ExchangeOut])
    def exchanges(request: Request, name: str, limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
        """The route's latest exchanges, with student and teacher answers side by side when shadowed."""
        admin_principal(request)
        _route_or_404(request, name)
        return stats_of(request).recent_exchanges(name, limit=limit)

    return router


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
