"""The student registry: versions of each route's student in the ledger's ``students`` table.

A version is registered as a ``candidate``; promotion makes it ``live`` (the gateway serves it) and
retires the previous live version. Rollback is promotion of an earlier version by a person. Every
change is also a ``route_events`` row, so the dashboard can show the history.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gateway.ledger import StudentRefused
from router.artifact import verify_registered

log = logging.getLogger(__name__)

__all__ = ["RegistryError", "next_version", "register", "list_students", "get", "live", "promote", "rollback"]

_JSON_COLUMNS = ("metrics", "curve", "calibration")


class RegistryError(Exception):
    """A registry operation cannot be done (unknown version, corrupted artifact)."""


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for col in _JSON_COLUMNS:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row


def next_version(ledger: Any, route: str) -> int:
    """The version number the route's next student gets (1 for the first)."""
    return int(ledger.scalar("SELECT coalesce(max(version), 0) FROM students WHERE route = ?", (route,))) + 1


def register(
    ledger: Any,
    *,
    route: str,
    version: int,
    kind: str,
    artifact_path: str,
    checksum: str,
    train_pairs: int,
    val_pairs: int,
    metrics: dict[str, Any],
    curve: list[dict[str, float]],
    calibration: dict[str, Any],
    status: str = "candidate",
) -> dict[str, Any]:
    """Record a new version (a candidate unless told otherwise); returns its row."""
    with ledger.conn:
        ledger.conn.execute(
            "INSERT INTO students (route, version, kind, created, train_pairs, val_pairs, metrics, curve,"
            " calibration, artifact_path, checksum, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                route, version, kind, time.time(), train_pairs, val_pairs, json.dumps(metrics), json.dumps(curve),
                json.dumps(calibration), artifact_path, checksum, status,
            ),
        )
    ledger.record_event(
        route,
        "student.registered",
        actor="distiller",
        detail={"version": version, "kind": kind, "coverage_at_target": metrics.get("coverage_at_target"),
                "agreement": metrics.get("agreement")},
    )
    row = get(ledger, route, version)
    assert row is not None
    return row


def list_students(ledger: Any, route: str | None = None) -> list[dict[str, Any]]:
    """Every registered version (of one route), newest first, JSON columns decoded."""
    if route is None:
        rows = ledger.query("SELECT * FROM students ORDER BY route, version DESC")
    else:
        rows = ledger.query("SELECT * FROM students WHERE route = ? ORDER BY version DESC", (route,))
    return [_decode(r) for r in rows]


def get(ledger: Any, route: str, version: int) -> dict[str, Any] | None:
    rows = ledger.query("SELECT * FROM students WHERE route = ? AND version = ?", (route, version))
    return _decode(rows[0]) if rows else None


def live(ledger: Any, route: str) -> dict[str, Any] | None:
    """The route's live version, or None."""
    rows = ledger.query(
        "SELECT * FROM students WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1", (route,)
    )
    return _decode(rows[0]) if rows else None


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
