"""Which route a request belongs to, and that route's effective settings.

A request names its route explicitly (header ``X-KDGate-Route``, OpenAI's ``metadata.route``, or a
``model`` that is a configured route or alias) or gets one automatically: the requested model plus a
fingerprint of the prompt's static template. The template is learned online from the traffic itself.
Everything before the final user turn (system prompt, few-shot turns) is static by construction; in
the final turn, the static instruction wrapper is the common prefix/suffix that two requests share at
a line or ``Label:`` boundary. Until a wrapper has been seen twice, requests sharing a context go to
the context's bare route; the first request of a wrapper is moved to the wrapper's route when the
second one reveals it, so a task's history ends up in one route.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import BadRequest, UnknownRoute
from gateway.ledger import Ledger, LedgerWriter
from gateway.settings import ROUTE_NAME_PATTERN, RouteSettings, Settings
from gateway.teacher import TeacherTarget

__all__ = ["Route", "RouteTable", "message_text", "common_affixes"]

_ROUTE_RE = re.compile(ROUTE_NAME_PATTERN)
_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")
MIN_STATIC_CHARS = 12
PENDING_PER_CONTEXT = 32


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def common_affixes(a: str, b: str) -> tuple[str, str]:
    """Longest common prefix and suffix of two strings that do not overlap in either."""
    limit = min(len(a), len(b))
    lo, hi = 0, limit
    while lo < hi:  # binary search on startswith: C speed even for long prompts
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    prefix_len = lo
    lo, hi = 0, limit - prefix_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return a[:prefix_len], (a[len(a) - lo :] if lo else "")


def _trim_to_boundaries(prefix: str, suffix: str) -> tuple[str, str]:
    """Cut a shared prefix back to its last line break or ``Label: ``, a shared suffix forward to its
    first line break, so that words two variable texts happen to share at the edge ("Review: the ...")
    are not taken as template; without such a boundary, cut back to whitespace."""
    if prefix:
        colon = prefix.rfind(": ")
        cut = max(prefix.rfind("\n"), colon + 1 if colon >= 0 else -1)
        if cut >= 0:
            prefix = prefix[: cut + 1]
        elif not prefix[-1].isspace():
            ws = max(prefix.rfind(" "), prefix.rfind("\t"))
            prefix = prefix[: ws + 1] if ws >= 0 else ""
    if suffix:
        cut = suffix.find("\n")
        if cut >= 0:
            suffix = suffix[cut:]
        elif not suffix[0].isspace():
            cuts = [i for i in (suffix.find(" "), suffix.find("\t")) if i >= 0]
            suffix = suffix[min(cuts) :] if cuts else ""
    return prefix, suffix


def _is_template_boundary(prefix: str, suffix: str) -> bool:
    """Wrappers end at a line break or a ``Label:``; chat texts that merely start alike do not."""
    def strong(s: str) -> bool:
        stripped = s.strip()
        return "\n" in s or stripped.endswith(":") or stripped.startswith(":")

    return len(prefix.strip()) + len(suffix.strip()) >= MIN_STATIC_CHARS and (strong(prefix) or strong(suffix))


def _slug(model: str) -> str:
    base = model.split("/")[-1]
    return (_SLUG_RE.sub("-", base).strip("-._") or "model")[:48]


def _digest(*parts: str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:10]


@dataclass
class Route:
    """A route as the hot path needs it: its teacher and its effective settings."""

    name: str
    teacher: TeacherTarget
    origin: str  # "config" | "auto" | "admin"
    settings: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[TeacherTarget] = field(default_factory=list)


@dataclass
class _Wrapper:
    prefix: str
    suffix: str
    route: str

    def matches(self, text: str) -> bool:
        return len(text) >= len(self.prefix) + len(self.suffix) and text.startswith(self.prefix) and text.endswith(self.suffix)


@dataclass
class _Context:
    wrappers: list[_Wrapper] = field(default_factory=list)
    pending: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=PENDING_PER_CONTEXT))


class RouteTable:
    """Resolves requests to routes; keeps routes in memory, persisted in the ledger's ``routes`` table."""

    def __init__(self, settings: Settings, ledger: Ledger, writer: LedgerWriter | None):
        self.settings = settings
        self.ledger = ledger
        self.writer = writer
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._aliases: dict[str, str] = {}
        self._contexts: dict[tuple[str, str], _Context] = {}
        self.reload()

    # -- loading --------------------------------------------------------------------------
    def reload(self) -> None:
        """(Re)read routes from config and the ledger; admin changes in the ledger win over config."""
        defaults = self._defaults()
        routes: dict[str, Route] = {}
        aliases: dict[str, str] = {}
        stored = {r["name"]: r for r in self.ledger.routes()}
        for name, cfg in self.settings.routes.items():
            configured = cfg.model_dump(exclude={"teacher", "teacher_api_base", "aliases", "fallback_teachers"}, exclude_none=True)
            current = (stored.get(name) or {}).get("settings") or {}
            missing = {k: v for k, v in configured.items() if k not in current}
            if name not in stored or missing:
                # the distiller reads a route's settings from the ledger: give it the configured ones,
                # without overwriting what an admin has changed since
                self.ledger.upsert_route(name, teacher_model=cfg.teacher or self.settings.teacher, settings=missing, origin="config")
                stored[name] = self.ledger.route(name) or {}
            aliases[name] = name
            for alias in cfg.aliases:
                aliases[alias] = name
        contexts: dict[tuple[str, str], _Context] = {}
        for name, row in stored.items():
            cfg = self.settings.routes.get(name, RouteSettings())
            merged = dict(defaults)
            merged.update({k: v for k, v in cfg.model_dump(exclude={"teacher", "teacher_api_base", "aliases", "fallback_teachers"}).items() if v is not None})
            merged.update(row.get("settings") or {})
            teacher = TeacherTarget(
                model=cfg.teacher or row.get("teacher_model") or self.settings.teacher,
                api_base=cfg.teacher_api_base or merged.get("teacher_api_base") or self.settings.teacher_api_base,
            )
            fallbacks = [TeacherTarget(model=f.model, api_base=f.api_base) for f in cfg.fallback_teachers]
            routes[name] = Route(name=name, teacher=teacher, origin=row.get("origin") or "config", settings=merged, fallbacks=fallbacks)
            tpl = row.get("template")
            if tpl and tpl.get("kind") == "auto":
                ctx = contexts.setdefault((tpl["model"], tpl["context"]), _Context())
                if tpl.get("prefix") or tpl.get("suffix"):
                    ctx.wrappers.append(_Wrapper(tpl["prefix"], tpl["suffix"], name))
        with self._lock:
            self._routes = routes
            self._aliases = aliases
            # keep pending texts learned since start; replace wrappers with the stored truth
            for key, ctx in contexts.items():
                old = self._contexts.get(key)
                if old is not None:
                    ctx.pending = old.pending
            for key, ctx in self._contexts.items():
                contexts.setdefault(key, ctx)
            self._contexts = contexts

    def _defaults(self) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": s.default_mode,
            "threshold": None,
            "target_agreement": s.default_target_agreement,
            "shadow_rate": s.default_shadow_rate,
            "auto_cascade": s.auto_cascade,
            "allow_student_when_teacher_down": False,
            "pii_scrub": False,
        }

    # -- lookups --------------------------------------------------------------------------
    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def all(self) -> list[Route]:
        return sorted(self._routes.values(), key=lambda r: r.name)

    def update_settings(self, name: str, changes: dict[str, Any], *, actor: str) -> Route:
        """Persist setting changes for a route (they survive restarts) and apply them at once."""
        route = self._routes.get(name)
        if route is None:
            raise UnknownRoute(f"No route named {name!r}.", param="route")
        self.ledger.upsert_route(name, teacher_model=route.teacher.model, settings=changes)
        self.ledger.record_event(name, "settings", actor=actor, detail=changes)
        with self._lock:
            route.settings = {**route.settings, **changes}
        return route

    def create(self, name: str, *, teacher: str | None = None, settings: dict[str, Any] | None = None, actor: str = "admin") -> Route:
        if not _ROUTE_RE.match(name):
            raise BadRequest(f"Route names must match {ROUTE_NAME_PATTERN}.", param="name")
        self.ledger.upsert_route(name, teacher_model=teacher or self.settings.teacher, settings=settings or {}, origin="admin")
        self.ledger.record_event(name, "created", actor=actor, detail={"teacher": teacher})
        self.reload()
        return self._routes[name]

    # -- resolution -----------------------------------------------------------------------
    def resolve(self, body: dict[str, Any], header_route: str | None, uid: str) -> Route:
        """The route of one request; raises UnknownRoute/BadRequest for a bad explicit name."""
        name = header_route
        if name is None:
            meta = body.get("metadata")
            if isinstance(meta, dict) and meta.get("route") is not None:
                name = meta["route"]
                if not isinstance(name, str):
                    raise BadRequest("metadata.route must be a string.", param="metadata.route")
        model = body.get("model")
        if name is None and isinstance(model, str) and model in self._aliases:
            return self._routes[self._aliases[model]]
        if name is not None:
            if not _ROUTE_RE.match(name):
                raise BadRequest(
                    f"Invalid route name: route names must match {ROUTE_NAME_PATTERN}.", param="route"
                )
            route = self._routes.get(name)
            if route is None:
                if not self.settings.allow_new_routes:
                    raise UnknownRoute(
                        f"Unknown route {name!r}. Create it with `kdgate routes create {name}` or the admin API, "
                        "or set allow_new_routes = true.",
                        param="route",
                    )
                route = self._add_route(name, teacher=self._teacher_for(model), origin="auto", template=None)
            return route
        return self._resolve_auto(model if isinstance(model, str) else "", body.get("messages") or [], uid)

    def _teacher_for(self, model: str | None) -> str:
        """The teacher of an automatic route: the requested model when it is a provider model, else the default."""
        default = self.settings.teacher
        if not model:
            return default
        default_provider = default.split("/", 1)[0] if "/" in default else "openai"
        if model == default or model == default.split("/", 1)[-1]:
            return default
        if "/" in model:
            return model
        from gateway.costs import _model_cost  # the price map doubles as the list of known models

        if model in _model_cost():
            return f"{default_provider}/{model}"
        return default

    def _resolve_auto(self, model: str, messages: list[Any], uid: str) -> Route:
        context_parts = [model]
        final = ""
        if messages:
            *head, last = messages
            for m in head:
                if isinstance(m, dict):
                    context_parts.append(f"{m.get('role')}\x01{message_text(m)}")
            if isinstance(last, dict):
                context_parts.append(f"last:{last.get('role')}")
                final = message_text(last)
        context = _digest(*context_parts)
        key = (model, context)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is None:
                ctx = self._contexts[key] = _Context()
            for wrapper in ctx.wrappers:
                if wrapper.matches(final):
                    return self._routes[wrapper.route]
            found: tuple[str, str, str] | None = None
            for other, other_uid in ctx.pending:
                if other == final:
                    continue
                prefix, suffix = _trim_to_boundaries(*common_affixes(final, other))
                if _is_template_boundary(prefix, suffix):
                    found = (prefix, suffix, other_uid)
                    break
            if found is None:
                ctx.pending.append((final, uid))
                bare = f"{_slug(model)}-{context}"
                route = self._routes.get(bare)
        if found is None:
            if route is None:
                route = self._add_route(
                    bare, teacher=self._teacher_for(model), origin="auto",
                    template={"kind": "auto", "model": model, "context": context, "prefix": "", "suffix": ""},
                )
            return route
        prefix, suffix, first_uid = found
        with self._lock:
            for wrapper in ctx.wrappers:
                if wrapper.prefix.startswith(prefix) and wrapper.suffix.endswith(suffix):
                    # a wider wrapper of a task already known (the first pair shared more than the
                    # template): widen it, keep the route
                    wrapper.prefix, wrapper.suffix = prefix, suffix
                    generalised = wrapper
                    break
            else:
                generalised = None
        if generalised is not None:
            template = {"kind": "auto", "model": model, "context": context, "prefix": prefix, "suffix": suffix}
            if self.writer is not None:
                self.writer.submit_sql("UPDATE routes SET template = ? WHERE name = ?", (json.dumps(template), generalised.route))
                self.writer.submit_sql("UPDATE exchanges SET route = ? WHERE uid = ?", (generalised.route, first_uid))
            return self._routes[generalised.route]
        name = f"{_slug(model)}-{_digest(model, context, prefix, suffix)}"
        route = self._routes.get(name) or self._add_route(
            name, teacher=self._teacher_for(model), origin="auto",
            template={"kind": "auto", "model": model, "context": context, "prefix": prefix, "suffix": suffix},
        )
        with self._lock:
            ctx.wrappers.append(_Wrapper(prefix, suffix, name))
            ctx.pending = deque(((t, u) for t, u in ctx.pending if not (t.startswith(prefix) and t.endswith(suffix))), maxlen=PENDING_PER_CONTEXT)
        if self.writer is not None:
            # the request that first showed this wrapper went to the bare route: move it here
            self.writer.submit_sql("UPDATE exchanges SET route = ? WHERE uid = ?", (name, first_uid))
        return route

    def _add_route(self, name: str, *, teacher: str, origin: str, template: dict[str, Any] | None) -> Route:
        if origin == "auto" and name not in self._routes:
            autos = sum(1 for r in self._routes.values() if r.origin == "auto")
            if autos >= self.settings.max_auto_routes:
                # a client sending ever-new models or templates must not grow the table without bound
                name, template = "auto-overflow", None
                if name in self._routes:
                    return self._routes[name]
        route = Route(
            name=name,
            teacher=TeacherTarget(model=teacher, api_base=self.settings.teacher_api_base),
            origin=origin,
            settings=self._defaults(),
        )
        with self._lock:
            existing = self._routes.get(name)
            if existing is not None:
                return existing
            self._routes[name] = route
        now = time.time()
        sql = (
            "INSERT OR IGNORE INTO routes (name, teacher_model, settings, template, origin, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        params = (name, teacher, "{}", json.dumps(template) if template else None, origin, now, now)
        if self.writer is not None:
            self.writer.submit_sql(sql, params)
        else:
            with self.ledger.conn:
                self.ledger.conn.execute(sql, params)
        return route
