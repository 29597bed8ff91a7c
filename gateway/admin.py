"""The admin API: routes and keys. Only the admin key gets in; a gateway key gets 403."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field


from gateway.auth import Principal, bearer_token, create_key
from gateway.errors import NotFound, PermissionDenied, UnknownRoute

CSRF_HEADER = "x-kdgate-csrf"

__all__ = ["build_admin_router", "admin_principal"]


class RouteUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["off", "shadow", "cascade"] | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)
    target_agreement: float | None = Field(default=None, gt=0, le=1)
    target_confidence: float | None = Field(default=None, ge=0.5, lt=1)
    shadow_rate: float | None = Field(default=None, ge=0, le=1)
    auto_cascade: bool | None = None
    allow_student_when_teacher_down: bool | None = None
    pii_scrub: bool | None = None
    allowed_keys: list[str] | None = Field(default=None, description="key ids or names that may use the route")
    train_on_allowed_keys_only: bool | None = None
    clear_threshold: bool = Field(default=False, description="forget a direct threshold and use the target again")
    clear_allowed_keys: bool = Field(default=False, description="let every key use the route again")


class RouteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    teacher: str | None = None


class KeyLimits(BaseModel):
    """Per-key limits; null clears one (unlimited)."""

    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, ge=1, le=10**9, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, le=10**15, description="tokens per minute")
    budget_day_usd: float | None = Field(default=None, ge=0, le=1e12, description="spend per UTC day")
    budget_month_usd: float | None = Field(default=None, ge=0, le=1e12, description="spend per UTC month")
    routes: list[str] | None = Field(default=None, max_length=1000,
                                     description="route names or globs the key may use (null: every route)")


class KeyCreate(KeyLimits):
    name: str = Field(min_length=1, max_length=100)


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def admin_principal(request: Request) -> Principal:
    state = request.app.state.kdgate
    token = bearer_token(request.headers.get("authorization"))
    if token is None and hasattr(request.app.state, "sessions"):
        token = request.app.state.sessions.token_for(request)
    if not state.settings.auth and request.method.upper() not in _SAFE_METHODS and token is None:
        # Without auth, anything on the operator's machine can reach the admin API; a page in their
        # browser can too, with a plain form post. A custom header cannot be sent cross-site without a
        # CORS preflight, which the gateway never grants, so writes must carry it.
        if not request.headers.get(CSRF_HEADER):
            raise PermissionDenied(
                f"Admin writes without auth need the {CSRF_HEADER} header (any value); the dashboard and the "
                "CLI send it. It keeps other web pages from changing routes through your browser.",
                code="csrf_required",
            )
    return state.keys.admin_principal(token)


def route_view(state: Any, name: str) -> dict[str, Any]:
    route = state.routes.get(name)
    if route is None:
        raise UnknownRoute(f"No route named {name!r}.", param="name")
    row = state.ledger.route(name) or {}
    out = {
        "name": route.name,
        "teacher": route.teacher.model,
        "origin": route.origin,
        "settings": route.settings,
        "template": row.get("template"),
        "exchanges": state.ledger.count_exchanges(name),
    }
    if state.students is not None:
        out.update(state.students.describe(name))
    return out


def build_admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])

    @router.get("/routes")
    async def list_routes(request: Request) -> list[dict[str, Any]]:
        """Every route with its settings and exchange count."""
        admin_principal(request)
        state = request.app.state.kdgate
        return [route_view(state, r.name) for r in state.routes.all()]

    @router.post("/routes", status_code=201)
    async def create_route(request: Request, body: RouteCreate) -> dict[str, Any]:
        """Create a named route (requests then name it by header, metadata or model)."""
        who = admin_principal(request)
        state = request.app.state.kdgate
        state.routes.create(body.name, teacher=body.teacher, actor=who.name)
        return route_view(state, body.name)

    @router.get("/routes/{name}")
    async def show_route(request: Request, name: str) -> dict[str, Any]:
        admin_principal(request)
        return route_view(request.app.state.kdgate, name)

    @router.patch("/routes/{name}")
    async def update_route(request: Request, name: str, body: RouteUpdate) -> dict[str, Any]:
        """Change a route's mode or threshold; takes effect on the next request and survives restarts."""
        who = admin_principal(request)
        state = request.app.state.kdgate
        changes = body.model_dump(exclude_none=True, exclude={"clear_threshold", "clear_allowed_keys"})
        if body.clear_threshold:
            changes["threshold"] = None
        if body.clear_allowed_keys:
            changes["allowed_keys"] = None
        if not changes:
            return route_view(state, name)
        state.routes.update_settings(name, changes, actor=who.name)
        if state.students is not None:
            state.students.settings_changed(name)
        return route_view(state, name)

    @router.get("/routes/{name}/events")
    async def route_events(request: Request, name: str) -> list[dict[str, Any]]:
        admin_principal(request)
        return request.app.state.kdgate.ledger.events(name)

    @router.get("/keys")
    async def list_keys(request: Request) -> list[dict[str, Any]]:
        """Gateway keys (ids and names only; keys are stored hashed)."""
        admin_principal(request)
        return request.app.state.kdgate.ledger.keys()

    @router.post("/keys", status_code=201)
    async def create_gateway_key(request: Request, body: KeyCreate) -> dict[str, Any]:
        """Create a gateway key. The key is in this response only; it cannot be shown again."""
        admin_principal(request)
        state = request.app.state.kdgate
        key_id, key = create_key(state.ledger, body.name)
        limits = body.model_dump(exclude={"name"}, exclude_none=True)
        if limits:
            state.ledger.set_key_limits(key_id, limits)
        return {"id": key_id, "name": body.name, "key": key, **limits}

    @router.patch("/keys/{key_id}")
    async def set_key_limits(request: Request, key_id: str, body: KeyLimits) -> dict[str, Any]:
        """Set a key's limits (fields sent as null are cleared); enforced from the next request."""
        admin_principal(request)
        state = request.app.state.kdgate
        if not state.ledger.set_key_limits(key_id, body.model_dump(exclude_unset=True)):
            raise NotFound(f"No key {key_id!r}.")
        state.keys.invalidate()
        if state.chat.limiter is not None:
            state.chat.limiter.forget(key_id)
        return next(k for k in state.ledger.keys() if k["id"] == key_id or k["name"] == key_id)

    @router.delete("/keys/{key_id}")
    async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
        admin_principal(request)
        state = request.app.state.kdgate
        if not state.ledger.revoke_key(key_id):
            raise NotFound(f"No active key {key_id!r}.")
        state.keys.invalidate()
        return {"id": key_id, "revoked": True}

    return router
