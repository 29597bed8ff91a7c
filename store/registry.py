"""The student registry: versions of each route's student, in the ``students`` table.

A version is registered as a ``candidate``; promotion makes it ``live`` (the gateway serves it)
and retires the previous live version, in one transaction (:meth:`store.Ledger.set_live_student`,
which runs the caller's artifact check first). Every change is also a ``route_events`` row, so the
dashboard can show the history. JSON columns (metrics, curve, calibration) come back decoded.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["next_version", "register", "list_students", "get", "live", "latest_finetuned", "counted_train_pairs"]

_JSON_COLUMNS = ("metrics", "curve", "calibration")


def _decode(row: Any) -> dict[str, Any]:
    out = dict(row)
    for col in _JSON_COLUMNS:
        if isinstance(out.get(col), str):
            out[col] = json.loads(out[col])
    return out


def next_version(ledger: Any, route: str) -> int:
    """The version number the route's next student gets (1 for the first)."""
    return int(ledger.conn.execute("SELECT coalesce(max(version), 0) FROM students WHERE route = ?", (route,)).fetchone()[0]) + 1


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
    with ledger.transaction():
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
    """Every registered version (of one route), newest first."""
    if route is None:
        rows = ledger.conn.execute("SELECT * FROM students ORDER BY route, version DESC")
    else:
        rows = ledger.conn.execute("SELECT * FROM students WHERE route = ? ORDER BY version DESC", (route,))
    return [_decode(r) for r in rows.fetchall()]


def get(ledger: Any, route: str, version: int) -> dict[str, Any] | None:
    row = ledger.conn.execute("SELECT * FROM students WHERE route = ? AND version = ?", (route, version)).fetchone()
    return _decode(row) if row else None


def live(ledger: Any, route: str) -> dict[str, Any] | None:
    """The route's live version, or None."""
    row = ledger.conn.execute(
        "SELECT * FROM students WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1", (route,)
    ).fetchone()
    return _decode(row) if row else None


def latest_finetuned(ledger: Any, route: str) -> dict[str, Any] | None:
    """The route's newest label/structured version with a fine-tuned encoder: version, artifact_path,
    checksum, ``trained_through`` (the newest exchange id the encoder was tuned on; older
    versions did not record it, and their newest exchange, which is later, stands in) and ``split``
    (the validation split of the run that tuned it: "holdout" means it never saw a held-out prompt)."""
    newest = None
    for row in list_students(ledger, route):
        if row["kind"] in ("label", "structured") and (row.get("metrics") or {}).get("encoder") == "finetuned":
            newest = row
            break
    if newest is None:
        return None
    m = newest["metrics"]
    through = next((v for v in (m.get("encoder_trained_through"), m.get("last_exchange_id")) if v is not None), 0)
    return {"version": newest["version"], "artifact_path": newest["artifact_path"], "checksum": newest["checksum"],
            "trained_through": through, "split": m.get("encoder_split") or "newest"}


def counted_train_pairs(ledger: Any, route: str, version: int) -> int:
    """A version's training pairs, counting those its validation reached back for (cascade mode)."""
    row = get(ledger, route, version)
    if row is None:
        return 0
    return int((row.get("train_pairs") or 0) + ((row.get("metrics") or {}).get("val_reach_back") or 0))
