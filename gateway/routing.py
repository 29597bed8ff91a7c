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

import fnmatch
import hashlib
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog import TeacherCatalog
from gateway.errors import BadRequest, RouteNotAllowed, UnknownRoute
from store import Ledger, LedgerWriter
from gateway.settings import ROUTE_NAME_PATTERN, RouteSettings, Settings, valid_route_name
from gateway.teacher import TeacherTarget
from router.text import message_text

__all__ = ["Route", "RouteTable", "message_text", "common_affixes", "route_allowed", "catalog_for"]

_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")
MIN_STATIC_CHARS = 12
PENDING_PER_CONTEXT = 32
# The text a context keeps of each pending request: its head and its tail. A wrapper longer than this
# is learned as this much of it; the rest of the prompt is never needed to find one.
KEEP_HEAD_CHARS = 4096
KEEP_TAIL_CHARS = 4096


def _clip(text: str) -> str:
    if len(text) <= KEEP_HEAD_CHARS + KEEP_TAIL_CHARS:
        return text
    return text[:KEEP_HEAD_CHARS] + text[-KEEP_TAIL_CHARS:]


def _text_bytes(text: str) -> int:
    """About what a str costs in memory (CPython stores 1, 2 or 4 bytes per character)."""
    return 64 + len(text) * (1 if text.isascii() else 4)


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
    added_at: float = 0.0  # time.monotonic() when this process added it (its row may still be queued)


# A route this process added is kept across a reload until its row is surely written (the writer's
# flush window is 50 ms; a locked database can hold rows longer, and they are written after).
UNSTORED_GRACE_S = 60.0


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
    # (clipped final-turn text, uid) of requests that showed no known wrapper yet
    pending: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=PENDING_PER_CONTEXT))

    @property
    def pending_bytes(self) -> int:
        return sum(_text_bytes(t) for t, _ in self.pending)


def catalog_for(settings: Settings) -> TeacherCatalog:
    """The teachers clients may name under these settings (see :mod:`gateway.catalog`)."""
    teachers = list(settings.teachers)
    for cfg in settings.routes.values():
        if cfg.teacher:
            teachers.append(cfg.teacher)
        teachers.extend(f.model for f in cfg.fallback_teachers)
    return TeacherCatalog(
        default=settings.teacher, teachers=teachers, patterns=settings.model_patterns,
        unknown=settings.teacher_for_unknown_models,
    )


def route_allowed(principal: Any, route: "Route") -> bool:
    """Whether the caller may use ``route``: within the key's route scope (if it has one), and among
    the route's ``allowed_keys`` (if it has them). The admin key and auth-less local use may use any."""
    if principal is None or getattr(principal, "admin", False) or not getattr(principal, "key_id", ""):
        return True
    scope = getattr(principal, "routes", None)
    if scope is not None and not any(fnmatch.fnmatchcase(route.name, p) for p in scope):
        return False
    allowed = route.settings.get("allowed_keys")
    if allowed is not None and principal.key_id not in allowed and principal.name not in allowed:
        return False
    return True


class RouteTable:
    """Resolves requests to routes; keeps routes in memory, persisted in the ledger's ``routes`` table."""

    def __init__(self, settings: Settings, ledger: Ledger, writer: LedgerWriter | None):
        self.settings = settings
        self.ledger = ledger
        self.writer = writer
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._aliases: dict[str, str] = {}
        # Contexts in least-recently-used order; the pending texts of all of them together are kept
        # under template_memory_bytes (the oldest contexts' are dropped first).
        self._contexts: OrderedDict[tuple[str, str], _Context] = OrderedDict()
        self._pending_bytes = 0
        self.catalog = catalog_for(settings)
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
        now = time.monotonic()
        with self._lock:
            unstored = {name: r for name, r in self._routes.items()
                        if name not in routes and r.added_at and now - r.added_at < UNSTORED_GRACE_S}
            routes.update(unstored)
            self._routes = routes
            self._aliases = aliases
            for route in routes.values():
                self.catalog.add(route.teacher.model)
            # keep pending texts learned since start; replace wrappers with the stored truth (and
            # the wrappers of routes whose rows are still on their way to the store)
            merged: OrderedDict[tuple[str, str], _Context] = OrderedDict()
            for key, ctx in self._contexts.items():
                fresh = contexts.pop(key, None)
                kept = [w for w in ctx.wrappers if w.route in unstored]
                if fresh is not None:
                    fresh.pending = ctx.pending
                    fresh.wrappers.extend(kept)
                    merged[key] = fresh
                elif ctx.pending or kept:
                    ctx.wrappers = kept
                    merged[key] = ctx
            for key, ctx in contexts.items():
                merged[key] = ctx
                merged.move_to_end(key, last=False)  # stored, not recently used
            self._contexts = merged
            self._pending_bytes = sum(c.pending_bytes for c in merged.values())

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
        if changes.get("mode") == "cascade" and route.settings.get("paused_by_drift"):
            changes = {**changes, "paused_by_drift": False}  # putting it back in cascade lifts a drift pause
        self.ledger.upsert_route(name, teacher_model=route.teacher.model, settings=changes)
        self.ledger.record_event(name, "settings", actor=actor, detail=changes)
        with self._lock:
            route.settings = {**route.settings, **changes}
        return route

    def claim_change(self, name: str, *, expect: dict[str, Any], changes: dict[str, Any], event: str, actor: str,
                     detail: Any) -> bool:
        """Persist a mode change decided by this process only if nobody (another replica) made it
        first (:meth:`store.Ledger.claim_route_change`); either way this process's copy follows."""
        cfg = self.settings.routes.get(name, RouteSettings())
        baseline = {**self._defaults(), **{k: v for k, v in cfg.model_dump(
            exclude={"teacher", "teacher_api_base", "aliases", "fallback_teachers"}).items() if v is not None}}
        claimed = self.ledger.claim_route_change(name, expect=expect, changes=changes, event=event, actor=actor,
                                                 detail=detail, baseline=baseline)
        route = self._routes.get(name)
        if route is not None and claimed:
            with self._lock:
                route.settings = {**route.settings, **changes}
        return claimed

    def create(self, name: str, *, teacher: str | None = None, settings: dict[str, Any] | None = None, actor: str = "admin") -> Route:
        if not valid_route_name(name):
            raise BadRequest(f"Route names must match {ROUTE_NAME_PATTERN}.", param="name")
        self.ledger.upsert_route(name, teacher_model=teacher or self.settings.teacher, settings=settings or {}, origin="admin")
        self.ledger.record_event(name, "created", actor=actor, detail={"teacher": teacher})
        self.reload()
        return self._routes[name]

    # -- resolution -----------------------------------------------------------------------
    def resolve(self, body: dict[str, Any], header_route: str | None, uid: str, *, principal: Any = None) -> Route:
        """The route of one request. Raises UnknownRoute/BadRequest for a bad explicit name,
        ModelNotFound for a model that is neither a route, an alias nor a configured teacher, and
        RouteNotAllowed when the caller's key may not use the route."""
        name = header_route
        if name is None:
            meta = body.get("metadata")
            if isinstance(meta, dict) and meta.get("route") is not None:
                name = meta["route"]
                if not isinstance(name, str):
                    raise BadRequest("metadata.route must be a string.", param="metadata.route")
        model = body.get("model")
        if name is None and isinstance(model, str) and model in self._aliases:
            return self._check_allowed(principal, self._routes[self._aliases[model]], uid)
        if name is not None:
            if not valid_route_name(name):
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
                if not route_allowed(principal, Route(name=name, teacher=TeacherTarget(self.settings.teacher), origin="auto")):
                    raise RouteNotAllowed(f"This key may not use route {name!r}.", param="route")
                route = self._add_route(name, teacher=self.teacher_for(model), origin="auto", template=None)
            return self._check_allowed(principal, route, uid)
        teacher = self.teacher_for(model)  # an unknown model is refused before anything is learned from it
        tenant = getattr(principal, "key_id", "") if self.settings.auto_routes_per_key else ""
        route = self._resolve_auto(model if isinstance(model, str) else "", body.get("messages") or [], uid, teacher,
                                   tenant=tenant)
        return self._check_allowed(principal, route, uid)

    def _check_allowed(self, principal: Any, route: Route, uid: str) -> Route:
        if route_allowed(principal, route):
            return route
        self.forget(uid)
        raise RouteNotAllowed(f"This key may not use route {route.name!r}.", param="model")

    def knows_model(self, model: Any) -> bool:
        """Whether a request may name ``model``: a configured route or alias, or a teacher clients may
        ask for (always, with ``teacher_for_unknown_models = "default"``)."""
        if not isinstance(model, str) or not model:
            return False
        return model in self._aliases or self.catalog.known(model) or self.catalog.unknown == "default"

    def model_names(self) -> dict[str, str]:
        """What ``GET /v1/models`` lists, each with its owner: the configured teachers by their bare
        names (as their provider names them), then the configured routes and their aliases."""
        names: dict[str, str] = {}
        for teacher in self.catalog.teachers:
            provider, _, bare = teacher.partition("/") if "/" in teacher else ("openai", "", teacher)
            names.setdefault(bare, provider)
        for alias in self._aliases:
            names.setdefault(alias, "kdgate")
        return names

    def teacher_for(self, model: Any) -> str:
        """The teacher a requested model names (raises ModelNotFound; see :mod:`gateway.catalog`)."""
        return self.catalog.resolve(model if isinstance(model, str) else None)

    def forget(self, uid: str) -> None:
        """Drop what was learned from request ``uid`` (it failed: nobody should learn a template from it)."""
        with self._lock:
            for ctx in self._contexts.values():
                for i, (text, other) in enumerate(ctx.pending):
                    if other == uid:
                        del ctx.pending[i]
                        self._pending_bytes -= _text_bytes(text)
                        return

    @property
    def template_memory(self) -> int:
        """Bytes of prompt text held for template learning (bounded by template_memory_bytes)."""
        return self._pending_bytes

    def _remember(self, ctx: _Context, text: str, uid: str) -> None:
        """Keep a pending text (under the lock); past template_memory_bytes, the least recently used
        contexts lose their pending texts first (a context's learned wrappers are kept: they are
        bounded by the routes), then this context its oldest."""
        if len(ctx.pending) == ctx.pending.maxlen:
            self._pending_bytes -= _text_bytes(ctx.pending[0][0])
        ctx.pending.append((text, uid))
        self._pending_bytes += _text_bytes(text)
        cap = self.settings.template_memory_bytes
        if self._pending_bytes <= cap:
            return
        for key in list(self._contexts):
            if self._pending_bytes <= cap:
                break
            other = self._contexts[key]
            if other is ctx:
                continue
            self._pending_bytes -= other.pending_bytes
            other.pending.clear()
            if not other.wrappers:
                del self._contexts[key]
        while self._pending_bytes > cap and ctx.pending:
            self._pending_bytes -= _text_bytes(ctx.pending.popleft()[0])

    def _resolve_auto(self, model: str, messages: list[Any], uid: str, teacher: str, *, tenant: str = "") -> Route:
        context_parts = [model, f"key:{tenant}"] if tenant else [model]
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
        clipped = _clip(final)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is None:
                ctx = self._contexts[key] = _Context()
            else:
                self._contexts.move_to_end(key)
            for wrapper in ctx.wrappers:
                if wrapper.matches(final) and wrapper.route in self._routes:
                    return self._routes[wrapper.route]
            found: tuple[str, str, str] | None = None
            for other, other_uid in ctx.pending:
                if other == clipped:
                    continue
                prefix, suffix = _trim_to_boundaries(*common_affixes(clipped, other))
                if _is_template_boundary(prefix, suffix):
                    found = (prefix, suffix, other_uid)
                    break
            if found is None:
                self._remember(ctx, clipped, uid)
                bare = f"{_slug(model)}-{context}"
                route = self._routes.get(bare)
        if found is None:
            if route is None:
                route = self._add_route(
                    bare, teacher=teacher, origin="auto",
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
                self.writer.set_route_template(generalised.route, template)
                self.writer.move_exchange(first_uid, generalised.route)
            return self._routes[generalised.route]
        name = f"{_slug(model)}-{_digest(model, context, prefix, suffix)}"
        route = self._routes.get(name) or self._add_route(
            name, teacher=teacher, origin="auto",
            template={"kind": "auto", "model": model, "context": context, "prefix": prefix, "suffix": suffix},
        )
        if route.name != name:  # past max_auto_routes: everything new shares the overflow route
            return route
        with self._lock:
            ctx.wrappers.append(_Wrapper(prefix, suffix, name))
            kept = deque(((t, u) for t, u in ctx.pending if not (t.startswith(prefix) and t.endswith(suffix))), maxlen=PENDING_PER_CONTEXT)
            self._pending_bytes += sum(_text_bytes(t) for t, _ in kept) - ctx.pending_bytes
            ctx.pending = kept
        if self.writer is not None:
            # the request that first showed this wrapper went to the bare route: move it here
            self.writer.move_exchange(first_uid, name)
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
            added_at=time.monotonic(),
        )
        with self._lock:
            existing = self._routes.get(name)
            if existing is not None:
                return existing
            self._routes[name] = route
        if self.writer is not None:
            self.writer.add_route(name, teacher_model=teacher, template=template, origin=origin)
        else:
            self.ledger.add_route(name, teacher_model=teacher, template=template, origin=origin)
        return route
