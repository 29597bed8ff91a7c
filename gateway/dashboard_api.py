"""The admin endpoints the dashboard page reads and writes, and their wire models (``/openapi.json``).

``/admin/overview``, ``/admin/routes-table``, ``/admin/routes/{name}/curve|preview|versions|exchanges``
and ``POST /admin/routes/{name}/promote|rollback/{version}``; each needs the admin key (or a
dashboard session). Mode and threshold changes go through ``PATCH /admin/routes/{name}``
(:mod:`gateway.admin`). The figures come from :class:`gateway.stats.Stats`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.admin import admin_principal
from gateway.errors import BadRequest, GatewayError, UnknownRoute
from gateway.stats import Stats, parse_since

log = logging.getLogger(__name__)

__all__ = ["build_stats_router", "stats_of"]


# -- wire models ------------------------------------------------------------------------------
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
    if students is not None:
        students.settings_changed(name)


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
