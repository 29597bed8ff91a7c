"""Aggregates for the dashboard, the admin API and ``kdgate stats``, kept fast by rollup tables.

The ledger's ``exchanges`` table grows by one row per request; summing it on every page view would
take seconds at a million rows. So this module keeps small rollup tables next to it and answers
every overview and routes-table question from them:

- ``stats_hourly``   (route, hour): requests, student answers, escalations, errors, cost, what the
  teacher alone would have cost, tokens;
- ``stats_latency``  (route, day, served_by, bucket): a log-scale latency histogram (10% wide
  buckets), so p50/p95 come from a few hundred rows instead of a sort over every exchange;
- ``stats_shadow``   (route, hour, student_version): live (shadow) checks and how many agreed,
  and what the extra teacher calls cost.

They are maintained by incremental catch-up: a watermark row per source table remembers the last
rolled-up id, and :meth:`Stats.refresh` (called before each read, at most once per
``min_interval_s``) folds in the rows written since, in id-ranged chunks so the ledger writer is
never blocked for long. SQLite hands out ids under its single write lock, so every id below the
largest committed one is already committed: the watermark never skips a row.

Definitions used everywhere (the API docs and the page say the same):

- *teacher-only spend* is ``sum(counterfactual_usd)``: what the traffic would have cost with the
  teacher answering every request;
- *actual spend* is ``sum(cost_usd)`` over exchanges plus ``sum(cost_usd)`` over shadow checks
  (teacher calls made only to check a student answer);
- *saved* is the difference;
- *student share* is student answers (status 200) over all requests;
- an *escalation* is a request the student was asked first and the teacher answered
  (``served_by='teacher' AND confidence IS NOT NULL``); the *escalation rate* is escalations over
  requests the student was asked first (student answers plus escalations).

Known limit: an exchange moved to another route after it was rolled up (the automatic router moves
the one request that first showed a new prompt template) stays counted under its first route.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Stats", "parse_since", "percentile_from_buckets", "latency_bucket", "bucket_upper_ms", "ROLLUP_SCHEMA"]

# Latency histogram: bucket 0 holds <= 0.1 ms, bucket b holds (0.1*1.1^(b-1), 0.1*1.1^b] ms.
_LAT_BASE_MS = 0.1
_LAT_RATIO = 1.1
_LAT_MAX_BUCKET = 250  # 0.1 ms * 1.1^250 is about 2e9 ms: far beyond any timeout

CHUNK_ROWS = 100_000

ROLLUP_SCHEMA = """
CREATE TABLE IF NOT EXISTS stats_hourly (
    route TEXT NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    ok INTEGER NOT NULL DEFAULT 0,
    student INTEGER NOT NULL DEFAULT 0,
    escalated INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    counterfactual_usd REAL NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (route, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stats_hourly_hour ON stats_hourly (hour);
CREATE TABLE IF NOT EXISTS stats_latency (
    route TEXT NOT NULL,
    day INTEGER NOT NULL,
    served_by TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (route, day, served_by, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats_shadow (
    route TEXT NOT NULL,
    hour INTEGER NOT NULL,
    student_version INTEGER NOT NULL,
    checks INTEGER NOT NULL DEFAULT 0,
    agree INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (route, hour, student_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats_watermark (source TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS shadow_checks_exchange_uid ON shadow_checks (exchange_uid);
"""

_HOURLY_SQL = """
INSERT INTO stats_hourly (route, hour, requests, ok, student, escalated, errors, cost_usd,
                          counterfactual_usd, prompt_tokens, completion_tokens)
SELECT route, CAST(ts / 3600 AS INTEGER) * 3600 AS h, count(*),
       sum(status = 200),
       sum(status = 200 AND served_by = 'student'),
       sum(served_by = 'teacher' AND confidence IS NOT NULL),
       sum(status != 200),
       total(cost_usd), total(counterfactual_usd),
       total(prompt_tokens), total(completion_tokens)
FROM exchanges WHERE id > ? AND id <= ?
GROUP BY route, h
ON CONFLICT (route, hour) DO UPDATE SET
    requests = requests + excluded.requests, ok = ok + excluded.ok,
    student = student + excluded.student, escalated = escalated + excluded.escalated,
    errors = errors + excluded.errors, cost_usd = cost_usd + excluded.cost_usd,
    counterfactual_usd = counterfactual_usd + excluded.counterfactual_usd,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""

_LATENCY_SQL = """
INSERT INTO stats_latency (route, day, served_by, bucket, n)
SELECT route, CAST(ts / 86400 AS INTEGER) * 86400 AS d, served_by, kd_latency_bucket(latency_ms) AS b, count(*)
FROM exchanges WHERE id > ? AND id <= ? AND status = 200 AND latency_ms IS NOT NULL
GROUP BY route, d, served_by, b
ON CONFLICT (route, day, served_by, bucket) DO UPDATE SET n = n + excluded.n
"""

_SHADOW_SQL = """
INSERT INTO stats_shadow (route, hour, student_version, checks, agree, cost_usd)
SELECT route, CAST(ts / 3600 AS INTEGER) * 3600 AS h, coalesce(student_version, 0), count(*),
       total(agree), total(cost_usd)
FROM shadow_checks WHERE id > ? AND id <= ?
GROUP BY route, h, coalesce(student_version, 0)
ON CONFLICT (route, hour, student_version) DO UPDATE SET
    checks = checks + excluded.checks, agree = agree + excluded.agree, cost_usd = cost_usd + excluded.cost_usd
"""


def latency_bucket(latency_ms: float | None) -> int:
    """The histogram bucket of a latency (10% wide, log scale)."""
    if latency_ms is None or latency_ms <= _LAT_BASE_MS:
        return 0
    b = math.ceil(math.log(latency_ms / _LAT_BASE_MS) / math.log(_LAT_RATIO) - 1e-9)
    return max(1, min(_LAT_MAX_BUCKET, b))


def bucket_upper_ms(bucket: int) -> float:
    """The upper edge of a latency bucket, in milliseconds."""
    return _LAT_BASE_MS * _LAT_RATIO**bucket


def percentile_from_buckets(counts: dict[int, int], q: float) -> float | None:
    """The q-quantile (0..1) of a latency histogram, interpolated inside its bucket (within 10%)."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for b in sorted(counts):
        n = counts[b]
        if seen + n >= rank:
            if b == 0:
                return _LAT_BASE_MS
            lo, hi = bucket_upper_ms(b - 1), bucket_upper_ms(b)
            frac = (rank - seen) / n if n else 1.0
            return lo * (hi / lo) ** frac  # geometric: the buckets are log-spaced
        seen += n
    return bucket_upper_ms(max(counts))


_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")


_LATEST_SINCE = 4102444800.0  # 2100-01-01: any later start time is a mistake


def _in_range(ts: float, given: object) -> float:
    if not math.isfinite(ts) or not 0.0 <= ts <= _LATEST_SINCE:
        raise ValueError(f"Cannot read since={str(given)[:80]!r}: a start time must fall between 1970 and 2100.")
    return ts


def parse_since(value: str | float | None, *, now: float | None = None, default: float | None = None) -> float | None:
    """A start time from ``24h``/``7d``/``30m``/``2w``, ``all``, a unix time or an ISO date (UTC).

    Returns None for ``all`` (no lower bound). Raises ValueError with a sentence for anything else.
    """
    now = time.time() if now is None else now
    if value is None or value == "":
        return default
    if isinstance(value, (int, float)):
        return _in_range(float(value), value)
    text = value.strip().lower()
    if text == "all":
        return None
    m = _SINCE_RE.match(text)
    if m:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
        return _in_range(now - float(m.group(1)) * unit, value)
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return _in_range(number, value)
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"Cannot read since={value[:80]!r}: use a span like 24h, 7d or 30m, 'all', a unix time, or an ISO date."
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        return _in_range(dt.timestamp(), value)
    except OverflowError:
        raise ValueError(f"Cannot read since={value[:80]!r}: a start time must fall between 1970 and 2100.") from None


def _day_start(ts: float) -> float:
    return float(int(ts // 86400) * 86400)


def _month_start(ts: float) -> float:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return datetime(dt.year, dt.month, 1, tzinfo=timezone.utc).timestamp()


def _ratio(num: float, den: float) -> float | None:
    return (num / den) if den else None


class Stats:
    """The dashboard's aggregates over one ledger. Thread-safe; cheap to keep for the app's lifetime."""

    def __init__(self, ledger: Any, *, min_interval_s: float = 0.0):
        self.ledger = ledger
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._last_refresh = 0.0
        self._schema_ready = False

    # -- rollup maintenance -----------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = self.ledger.conn
        conn.create_function("kd_latency_bucket", 1, latency_bucket, deterministic=True)
        return conn

    def ensure_schema(self) -> None:
        """Create the rollup tables (idempotent)."""
        if self._schema_ready:
            return
        conn = self._conn()
        for statement in ROLLUP_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        self._schema_ready = True

    def refresh(self, *, force: bool = False) -> int:
        """Fold exchanges and shadow checks written since the last refresh into the rollups.

        Returns how many source rows were folded in. Skipped (returns 0) when the last refresh was
        under ``min_interval_s`` ago, unless ``force``.
        """
        now = time.monotonic()
        if not force and now - self._last_refresh < self.min_interval_s:
            return 0
        with self._lock:
            if not force and time.monotonic() - self._last_refresh < self.min_interval_s:
                return 0
            self.ensure_schema()
            folded = self._catch_up("exchanges", (_HOURLY_SQL, _LATENCY_SQL))
            folded += self._catch_up("shadow_checks", (_SHADOW_SQL,))
            self._last_refresh = time.monotonic()
        if folded:
            log.debug("stats rollups: folded %d rows", folded)
        return folded

    def _catch_up(self, source: str, statements: Sequence[str]) -> int:
        conn = self._conn()
        top = int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {source}").fetchone()[0])
        folded = 0
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT last_id FROM stats_watermark WHERE source = ?", (source,)).fetchone()
                last = int(row[0]) if row else 0
                if last >= top:
                    conn.execute("COMMIT")
                    return folded
                upto = min(top, last + CHUNK_ROWS)
                for sql in statements:
                    conn.execute(sql, (last, upto))
                conn.execute(
                    "INSERT INTO stats_watermark (source, last_id) VALUES (?, ?)"
                    " ON CONFLICT (source) DO UPDATE SET last_id = excluded.last_id",
                    (source, upto),
                )
                conn.execute("COMMIT")
                folded += upto - last
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def rebuild(self) -> int:
        """Drop and rebuild every rollup from the ledger (after a route rename, say)."""
        with self._lock:
            self.ensure_schema()
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            for table in ("stats_hourly", "stats_latency", "stats_shadow", "stats_watermark"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("COMMIT")
        return self.refresh(force=True)

    # -- reads ------------------------------------------------------------------------------
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def _totals(self, since: float | None, until: float | None = None) -> dict[str, Any]:
        where, params = _range("hour", since, until)
        r = self._rows(
            "SELECT total(requests), total(student), total(escalated), total(errors), total(cost_usd),"
            f" total(counterfactual_usd), total(prompt_tokens), total(completion_tokens) FROM stats_hourly{where}",
            params,
        )[0]
        s = self._rows(f"SELECT total(checks), total(agree), total(cost_usd) FROM stats_shadow{where}", params)[0]
        requests, student, escalated, errors = int(r[0]), int(r[1]), int(r[2]), int(r[3])
        teacher_only = float(r[5])
        actual = float(r[4]) + float(s[2])
        return {
            "requests": requests,
            "student": student,
            "escalated": escalated,
            "errors": errors,
            "student_share": _ratio(student, requests),
            "teacher_only_usd": teacher_only,
            "actual_usd": actual,
            "saved_usd": teacher_only - actual,
            "prompt_tokens": int(r[6]),
            "completion_tokens": int(r[7]),
            "shadow_checks": int(s[0]),
            "live_agreement": _ratio(float(s[1]), float(s[0])),
        }

    def overview(self, *, bucket: str = "hour", since: float | None = None, now: float | None = None) -> dict[str, Any]:
        """Spend, saving and student share: all time, today, this month, the range, and a series.

        ``bucket`` is ``hour`` or ``day`` (UTC); ``since`` bounds the range and the series (None: all).
        """
        if bucket not in ("hour", "day"):
            raise ValueError(f"bucket must be 'hour' or 'day', not {bucket!r}.")
        self.refresh()
        now = time.time() if now is None else now
        width = 3600 if bucket == "hour" else 86400
        where, params = _range("hour", since, None)
        by_t: dict[int, dict[str, Any]] = {}
        for row in self._rows(
            f"SELECT (hour / {width}) * {width} AS t, total(requests), total(student), total(escalated),"
            f" total(cost_usd), total(counterfactual_usd) FROM stats_hourly{where} GROUP BY t ORDER BY t",
            params,
        ):
            by_t[int(row[0])] = {"t": int(row[0]), "requests": int(row[1]), "student": int(row[2]),
                                 "escalated": int(row[3]), "cost": float(row[4]), "teacher_only_usd": float(row[5])}
        for row in self._rows(
            f"SELECT (hour / {width}) * {width} AS t, total(cost_usd) FROM stats_shadow{where} GROUP BY t", params
        ):
            point = by_t.setdefault(int(row[0]), {"t": int(row[0]), "requests": 0, "student": 0, "escalated": 0,
                                                  "cost": 0.0, "teacher_only_usd": 0.0})
            point["cost"] += float(row[1])
        series = []
        for t in sorted(by_t):
            p = by_t[t]
            actual = p.pop("cost")
            p["actual_usd"] = actual
            p["saved_usd"] = p["teacher_only_usd"] - actual
            p["student_share"] = _ratio(p["student"], p["requests"])
            series.append(p)
        all_time = self._totals(None)
        return {
            "bucket": bucket,
            "since": since,
            "now": now,
            "totals": all_time,
            "range": self._totals(since) if since is not None else all_time,
            "saved": {
                "total": all_time["saved_usd"],
                "today": self._totals(_day_start(now))["saved_usd"],
                "month": self._totals(_month_start(now))["saved_usd"],
            },
            "series": series,
        }

    def routes_table(
        self, *, since: float | None = None, settings: dict[str, dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """One row per route: volume, student share, escalation rate, agreement, latency, savings.

        ``settings`` maps route name to its effective settings (mode, threshold...) from the route
        table; routes only in ``settings`` (no traffic yet) get a row of zeros.
        """
        self.refresh()
        settings = settings or {}
        where, params = _range("hour", since, None)
        rows: dict[str, dict[str, Any]] = {}

        def blank(name: str) -> dict[str, Any]:
            return {"route": name, "requests": 0, "student": 0, "escalated": 0, "errors": 0,
                    "cost_usd": 0.0, "teacher_only_usd": 0.0, "shadow_checks": 0, "shadow_agree": 0, "shadow_usd": 0.0}

        for name in settings:
            rows[name] = blank(name)
        for r in self._rows(
            "SELECT route, total(requests), total(student), total(escalated), total(errors), total(cost_usd),"
            f" total(counterfactual_usd) FROM stats_hourly{where} GROUP BY route",
            params,
        ):
            row = rows.setdefault(r[0], blank(r[0]))
            row.update(requests=int(r[1]), student=int(r[2]), escalated=int(r[3]), errors=int(r[4]),
                       cost_usd=float(r[5]), teacher_only_usd=float(r[6]))
        live = {
            r["route"]: r
            for r in self.ledger.query("SELECT route, version, kind, metrics FROM students WHERE status = 'live'")
        }
        shadow_live: dict[str, tuple[int, int]] = {}
        for r in self._rows(
            f"SELECT route, student_version, total(checks), total(agree), total(cost_usd) FROM stats_shadow{where}"
            " GROUP BY route, student_version",
            params,
        ):
            row = rows.setdefault(r[0], blank(r[0]))
            row["shadow_usd"] += float(r[4])
            lv = live.get(r[0])
            if lv is not None and int(r[1]) == int(lv["version"]):
                shadow_live[r[0]] = (int(r[2]), int(r[3]))
        latency = self._latency_by_route(since)
        out = []
        for name in sorted(rows):
            row = rows[name]
            lv = live.get(name)
            metrics = json.loads(lv["metrics"] or "{}") if lv else {}
            checks, agree = shadow_live.get(name, (0, 0))
            asked = row["student"] + row["escalated"]
            actual = row["cost_usd"] + row["shadow_usd"]
            cfg = settings.get(name, {})
            lat = latency.get(name, {})
            out.append({
                "route": name,
                "requests": row["requests"],
                "student_share": _ratio(row["student"], row["requests"]),
                "escalation_rate": _ratio(row["escalated"], asked),
                "validation_agreement": metrics.get("agreement"),
                "live_agreement": _ratio(agree, checks),
                "shadow_checks": checks,
                "student_p50_ms": lat.get("student", {}).get("p50"),
                "student_p95_ms": lat.get("student", {}).get("p95"),
                "teacher_p50_ms": lat.get("teacher", {}).get("p50"),
                "teacher_p95_ms": lat.get("teacher", {}).get("p95"),
                "live_version": int(lv["version"]) if lv else None,
                "student_kind": lv["kind"] if lv else None,
                "mode": cfg.get("mode"),
                "threshold": cfg.get("threshold"),
                "target_agreement": cfg.get("target_agreement"),
                "teacher_only_usd": row["teacher_only_usd"],
                "actual_usd": actual,
                "saved_usd": row["teacher_only_usd"] - actual,
                "errors": row["errors"],
            })
        return out

    def _latency_by_route(self, since: float | None) -> dict[str, dict[str, dict[str, float | None]]]:
        where, params = _range("day", _day_start(since) if since is not None else None, None)
        hist: dict[tuple[str, str], dict[int, int]] = {}
        for r in self._rows(
            f"SELECT route, served_by, bucket, total(n) FROM stats_latency{where} GROUP BY route, served_by, bucket",
            params,
        ):
            hist.setdefault((r[0], r[1]), {})[int(r[2])] = int(r[3])
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for (route, served_by), counts in hist.items():
            out.setdefault(route, {})[served_by] = {
                "p50": percentile_from_buckets(counts, 0.50),
                "p95": percentile_from_buckets(counts, 0.95),
            }
        return out

    # -- per-route detail (small queries on indexed columns; no rollup needed) ----------------
    def versions(self, route: str) -> list[dict[str, Any]]:
        """Every student version of a route, newest first, with validation metrics and live agreement."""
        self.refresh()
        shadow = {
            int(r[0]): (int(r[1]), int(r[2]))
            for r in self._rows(
                "SELECT student_version, total(checks), total(agree) FROM stats_shadow WHERE route = ?"
                " GROUP BY student_version",
                (route,),
            )
        }
        out = []
        for r in self.ledger.query(
            "SELECT version, kind, status, created, train_pairs, val_pairs, metrics FROM students"
            " WHERE route = ? ORDER BY version DESC",
            (route,),
        ):
            checks, agree = shadow.get(int(r["version"]), (0, 0))
            out.append({**r, "metrics": json.loads(r["metrics"] or "{}"), "shadow_checks": checks,
                        "live_agreement": _ratio(agree, checks)})
        return out

    def live_curve(self, route: str) -> tuple[int | None, list[dict[str, float]]]:
        """The live version of a route and its coverage/agreement curve (highest threshold first)."""
        rows = self.ledger.query(
            "SELECT version, curve FROM students WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1",
            (route,),
        )
        if not rows:
            return None, []
        curve = json.loads(rows[0]["curve"] or "[]")
        curve.sort(key=lambda p: -float(p["threshold"]))
        return int(rows[0]["version"]), curve

    def recent_exchanges(self, route: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """The route's latest exchanges, newest first, with the shadow check (if any) alongside."""
        cols = "e.uid, e.ts, e.served_by, e.status, e.latency_ms, e.cost_usd, e.counterfactual_usd," \
               " e.student_version, e.confidence, e.request, e.answer, e.error"
        rows = self.ledger.query(
            f"SELECT {cols}, s.student_answer AS shadow_student_answer, s.teacher_answer AS shadow_teacher_answer,"
            " s.agree AS shadow_agree FROM (SELECT * FROM exchanges WHERE route = ? ORDER BY ts DESC LIMIT ?) e"
            " LEFT JOIN shadow_checks s ON s.exchange_uid = e.uid ORDER BY e.ts DESC",
            (route, limit),
        )
        out = []
        for r in rows:
            try:
                messages = json.loads(r.pop("request") or "{}").get("messages") or []
            except (ValueError, AttributeError):
                messages = []
            shadow = None
            if r.get("shadow_agree") is not None:
                shadow = {"student_answer": r["shadow_student_answer"], "teacher_answer": r["shadow_teacher_answer"],
                          "agree": bool(r["shadow_agree"])}
            for k in ("shadow_student_answer", "shadow_teacher_answer", "shadow_agree"):
                r.pop(k, None)
            out.append({**r, "prompt": _prompt_text(messages), "shadow": shadow})
        return out


def _prompt_text(messages: list[Any]) -> str:
    """The last user message's text (what varies between a route's requests)."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _range(column: str, since: float | None, until: float | None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if since is not None:
        # the bucket containing ``since`` counts whole: rollups are hourly
        clauses.append(f"{column} >= ?")
        params.append(int(since // 3600 * 3600) if column == "hour" else int(since))
    if until is not None:
        clauses.append(f"{column} < ?")
        params.append(int(until))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
