"""Per-key limits kept in the store, so that every gateway replica counts against the same numbers.

- requests and tokens per minute: a sliding 60 s window of ``rate_events`` rows per key (a request
  counts one when it is let through; its tokens are added when its answer is known);
- spend per UTC day and month: ``key_spend``, added to by the ledger writer in the same transaction
  that writes the exchange row;
- budget holds: a request's maximum cost, held in ``budget_holds`` before the teacher is called and
  released by the writer in that same transaction, so spend and holds together never let concurrent
  requests on any replica spend past a budget.

Each check runs in one transaction that first takes a per-key lock (PostgreSQL advisory lock;
SQLite's write lock), so two replicas never both take the last request of a minute.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import time
from typing import Any

__all__ = ["SharedCounters", "period_keys", "HOLD_TTL_S"]

HOLD_TTL_S = 900.0  # a hold whose exchange never got a row (a crash in between) stops counting
WINDOW_S = 60.0


def period_keys(ts: float) -> tuple[str, str]:
    """The ``key_spend`` periods of a time: its UTC day and month."""
    t = time.gmtime(ts)
    return f"d:{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"m:{t.tm_year:04d}-{t.tm_mon:02d}"


def _next_month(now: float) -> float:
    t = time.gmtime(now)
    return calendar.timegm((t.tm_year + (t.tm_mon == 12), t.tm_mon % 12 + 1, 1, 0, 0, 0))


class SharedCounters:
    """The store side of shared limits (SQL lives here; the gateway's limiter decides)."""

    def __init__(self, ledger: Any):
        self.ledger = ledger

    def _lock(self, conn: Any, key_id: str) -> None:
        if conn.dialect.name == "postgresql":
            digest = hashlib.sha256(b"kdgate-key:" + key_id.encode()).digest()
            conn.execute("SELECT pg_advisory_xact_lock(?)", (int.from_bytes(digest[:8], "big", signed=True),))

    def take_request(self, key_id: str, *, rpm: int | None, tpm: int | None, est_tokens: int,
                     now: float | None = None) -> tuple[str | None, int, int]:
        """Count one request for ``key_id`` unless it would pass ``rpm`` or ``tpm`` over the last
        minute. Returns (None, 0, used) when counted, else ("rpm" | "tpm", seconds to wait, used)."""
        now = time.time() if now is None else now
        with self.ledger.transaction() as conn:
            self._lock(conn, key_id)
            conn.execute("DELETE FROM rate_events WHERE key_id = ? AND ts <= ?", (key_id, now - WINDOW_S))
            n, tokens = conn.execute(
                "SELECT coalesce(sum(requests), 0), coalesce(sum(tokens), 0) FROM rate_events WHERE key_id = ?",
                (key_id,)).fetchone()
            n, tokens = int(n), int(tokens)
            if rpm and n >= rpm:
                oldest = conn.execute("SELECT min(ts) FROM rate_events WHERE key_id = ? AND requests > 0",
                                      (key_id,)).fetchone()[0]
                return "rpm", max(1, math.ceil(float(oldest or now) + WINDOW_S - now)), n
            if tpm and tokens + est_tokens > tpm:
                oldest = conn.execute("SELECT min(ts) FROM rate_events WHERE key_id = ? AND tokens > 0",
                                      (key_id,)).fetchone()[0]
                return "tpm", max(1, math.ceil(float(oldest or now) + WINDOW_S - now)), tokens
            conn.execute("INSERT INTO rate_events (key_id, ts, requests, tokens) VALUES (?, ?, 1, 0)", (key_id, now))
        return None, 0, n

    def add_tokens(self, key_id: str, tokens: int, *, now: float | None = None) -> None:
        """Count the tokens an answered request used (towards tokens per minute)."""
        if tokens <= 0:
            return
        with self.ledger.transaction() as conn:
            conn.execute("INSERT INTO rate_events (key_id, ts, requests, tokens) VALUES (?, ?, 0, ?)",
                         (key_id, time.time() if now is None else now, int(tokens)))

    def spend(self, key_id: str, *, now: float | None = None) -> dict[str, float]:
        """Spend today and this month (UTC), and what requests in flight hold."""
        now = time.time() if now is None else now
        day, month = period_keys(now)
        conn = self.ledger.conn
        rows = dict(conn.execute("SELECT period, spend FROM key_spend WHERE key_id = ? AND period IN (?, ?)",
                                 (key_id, day, month)).fetchall())
        held = conn.execute("SELECT coalesce(sum(amount), 0) FROM budget_holds WHERE key_id = ? AND at > ?",
                            (key_id, now - HOLD_TTL_S)).fetchone()[0]
        return {"day": float(rows.get(day, 0.0)), "month": float(rows.get(month, 0.0)), "held": float(held)}

    def hold(self, key_id: str, uid: str, amount: float, *, budget_day: float | None, budget_month: float | None,
             now: float | None = None) -> tuple[str | None, dict[str, float], int]:
        """Hold ``amount`` for exchange ``uid`` unless spend plus holds plus it would pass a budget.
        Returns (None, figures, 0) when held, else ("daily" | "monthly", figures, seconds until the
        period ends)."""
        now = time.time() if now is None else now
        day, month = period_keys(now)
        with self.ledger.transaction() as conn:
            self._lock(conn, key_id)
            conn.execute("DELETE FROM budget_holds WHERE key_id = ? AND at <= ?", (key_id, now - HOLD_TTL_S))
            rows = dict(conn.execute("SELECT period, spend FROM key_spend WHERE key_id = ? AND period IN (?, ?)",
                                     (key_id, day, month)).fetchall())
            held = float(conn.execute("SELECT coalesce(sum(amount), 0) FROM budget_holds WHERE key_id = ?",
                                      (key_id,)).fetchone()[0])
            figures = {"day": float(rows.get(day, 0.0)), "month": float(rows.get(month, 0.0)), "held": held}
            day_end = (math.floor(now / 86400) + 1) * 86400
            for name, budget, spent, ends in (("daily", budget_day, figures["day"], day_end),
                                               ("monthly", budget_month, figures["month"], _next_month(now))):
                if budget is not None and (spent >= budget or (amount > 0 and spent + held + amount > budget)):
                    return name, figures, max(1, int(ends - now))
            if amount > 0:
                conn.execute("INSERT INTO budget_holds (uid, key_id, amount, at) VALUES (?, ?, ?, ?)"
                             " ON CONFLICT (uid) DO UPDATE SET amount = excluded.amount", (uid, key_id, amount, now))
        return None, figures, 0

    def release(self, uid: str) -> None:
        """Drop a hold whose exchange will not be written (the request failed before its row)."""
        with self.ledger.transaction() as conn:
            conn.execute("DELETE FROM budget_holds WHERE uid = ?", (uid,))

    def rebuild_spend(self) -> int:
        """Recompute ``key_spend`` from the exchanges (after copying a ledger); returns the rows written."""
        totals: dict[tuple[str, str], float] = {}
        for key_id, ts, cost in self.ledger.conn.execute(
                "SELECT key_id, ts, cost_usd FROM exchanges WHERE key_id IS NOT NULL AND key_id != '' AND cost_usd > 0"):
            for period in period_keys(float(ts)):
                totals[(key_id, period)] = totals.get((key_id, period), 0.0) + float(cost)
        with self.ledger.transaction() as conn:
            conn.execute("DELETE FROM key_spend")
            for (key_id, period), spend in totals.items():
                conn.execute("INSERT INTO key_spend (key_id, period, spend) VALUES (?, ?, ?)", (key_id, period, spend))
        return len(totals)
