"""A small registry helper over the ledger's ``students`` table, for LM students.

Kept here (not in ``distiller.registry``, written in parallel for label students) so this package does
not depend on unfinished code; the two should be unified. The promotion gate is the project's: a new
version goes live only if, at the route's target agreement, it covers more validation traffic than
the live version (or, with no live version, any traffic at all).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["next_version", "live_student", "register_student", "should_promote"]

log = logging.getLogger(__name__)


def next_version(ledger: Any, route: str) -> int:
    """One more than the route's highest registered version (1 for a new route)."""
    return int(ledger.scalar("SELECT coalesce(max(version), 0) FROM students WHERE route = ?", (route,))) + 1


def live_student(ledger: Any, route: str) -> dict[str, Any] | None:
    """The route's live ``students`` row, with ``metrics`` decoded, or None."""
    rows = ledger.query("SELECT * FROM students WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1", (route,))
    if not rows:
        return None
    row = rows[0]
    row["metrics"] = json.loads(row["metrics"] or "{}")
    return row


def should_promote(new_metrics: dict[str, Any], live: dict[str, Any] | None) -> tuple[bool, str]:
    """The promotion gate: (promote?, why)."""
    coverage = float(new_metrics.get("coverage_at_target") or 0.0)
    if live is None:
        return coverage > 0, f"no live version; coverage at target {coverage:.3f}"
    live_cov = float(live["metrics"].get("coverage_at_target") or 0.0)
    return coverage > live_cov, f"coverage at target {coverage:.3f} vs live v{live['version']} {live_cov:.3f}"


def register_student(
    ledger: Any,
    *,
    route: str,
    version: int,
    kind: str,
    train_pairs: int,
    val_pairs: int,
    metrics: dict[str, Any],
    curve: list[dict[str, float]],
    calibration: dict[str, Any],
    artifact_path: str,
    checksum: str,
    promote: bool = True,
) -> dict[str, Any]:
    """Insert a ``candidate`` row and, if ``promote`` and the gate passes, make it ``live``
    (retiring the previous live version) in the same transaction. Returns the row as stored."""
    conn = ledger.conn
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO students (route, version, kind, created, train_pairs, val_pairs, metrics, curve,"
            " calibration, artifact_path, checksum, status) VALUES (?,?,?,?,?,?,?,?,?,?,?, 'candidate')",
            (
                route,
                version,
                kind,
                time.time(),
                train_pairs,
                val_pairs,
                json.dumps(metrics),
                json.dumps(curve),
                json.dumps(calibration),
                artifact_path,
                checksum,
            ),
        )
        status = "candidate"
        if promote:
            live = live_student(ledger, route)
            ok, why = should_promote(metrics, live)
            if ok:
                conn.execute("UPDATE students SET status = 'retired' WHERE route = ? AND status = 'live'", (route,))
                conn.execute("UPDATE students SET status = 'live' WHERE route = ? AND version = ?", (route, version))
                status = "live"
            log.info("route %s: lm student v%d %s (%s)", route, version, "promoted" if ok else "kept as candidate", why)
    if status == "live":
        ledger.record_event(route, "student_promoted", detail={"version": version, "kind": kind})
    rows = ledger.query("SELECT * FROM students WHERE route = ? AND version = ?", (route, version))
    return rows[0]
