"""The student registry: versions of each route's student in the ledger's ``students`` table.

A version is registered as a ``candidate``; promotion makes it ``live`` (the gateway serves it) and
retires the previous live version. Rollback is promotion of an earlier version by a person. Every
change is also a ``route_events`` row, so the dashboard can show the history.
"""

from __future__ import annotations

import logging
from typing import Any

from router.artifact import verify_registered
from store import StudentRefused
from store import registry as store_registry

log = logging.getLogger(__name__)

__all__ = ["RegistryError", "next_version", "register", "list_students", "get", "live", "promote", "rollback"]

# The registry's rows live in the store; what the distiller adds is the artifact check on promotion.
next_version = store_registry.next_version
register = store_registry.register
list_students = store_registry.list_students
get = store_registry.get
live = store_registry.live


class RegistryError(Exception):
    """A registry operation cannot be done (unknown version, corrupted artifact)."""


def promote(
    ledger: Any, route: str, version: int, *, actor: str = "distiller", reason: str = "", event: str = "student.promoted"
) -> dict[str, Any]:
    """Make ``version`` the route's live student (retiring the current one).

    The artifact is verified against the registered checksum first: a modified or corrupted
    artifact is refused with :class:`RegistryError` and nothing changes.
    """
    try:
        ledger.set_live_student(route, version, actor=actor, reason=reason, event=event, verify=verify_registered)
    except StudentRefused as exc:
        raise RegistryError(str(exc)) from exc
    log.info("route %s: version %d is live (%s)", route, version, reason or event)
    out = get(ledger, route, version)
    assert out is not None
    return out


def rollback(ledger: Any, route: str, version: int, *, actor: str = "cli") -> dict[str, Any]:
    """Put an earlier version back live (an operator's decision: no promotion gate)."""
    return promote(ledger, route, version, actor=actor, reason="rollback", event="student.rollback")
