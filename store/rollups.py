"""The dashboard's rollups: small tables kept beside ``exchanges`` so every figure answers in
milliseconds at a million rows.

- ``stats_hourly``   (route, hour): requests, student answers, escalations, errors, cost, what the
  teacher alone would have cost, tokens;
- ``stats_latency``  (route, day, served_by, bucket): a log-scale latency histogram (10% wide
  buckets), so p50/p95 come from a few hundred rows instead of a sort over every exchange;
- ``stats_shadow``   (route, hour, student_version): shadow checks, how many agreed, and what the
  teacher calls made only to check cost.

They are maintained by incremental catch-up: a watermark row per source table remembers the last
rolled-up id, and :meth:`Rollups.refresh` folds in the rows written since, in id-ranged chunks so
the ledger writer is never blocked for long. SQLite hands out ids under its single write lock, so
every id below the largest committed one is already committed: the watermark never skips a row.
Rows are never changed after they are written (a shadow check's cost is its own row), so a row
rolled up once is counted once, whenever the rollup runs.

The reads return sums; what they mean in money (actual spend, saved) is :mod:`gateway.money`'s.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Rollups", "latency_bucket", "bucket_upper_ms", "percentile_from_buckets", "LATENCY_MAX_BUCKET"]

# Latency histogram: bucket 0 holds <= 0.1 ms, bucket b holds (0.1*1.1^(b-1), 0.1*1.1^b] ms.
_LAT_BASE_MS = 0.1
_LAT_RATIO = 1.1
LATENCY_MAX_BUCKET = 250  # 0.1 ms * 1.1^250 is about 2e9 ms: far beyond any timeout

CHUNK_ROWS = 100_000


def _statements(d: Any, source: str) -> list[str]:
    """The fold statements of one source table, for dialect ``d``; each takes ``{where}`` (the
    rows to fold) and is a sum per bucket added to what the rollup already holds."""
    if source == "exchanges":
        hour, day = d.floor_div("ts", 3600), d.floor_div("ts", 86400)
        return [
            f"""INSERT INTO stats_hourly (route, hour, requests, ok, student, escalated, errors, cost_usd,
                          counterfactual_usd, prompt_tokens, completion_tokens)
SELECT route, {hour} AS h, count(*),
       sum(CASE WHEN status = 200 THEN 1 ELSE 0 END),
       sum(CASE WHEN status = 200 AND served_by = 'student' THEN 1 ELSE 0 END),
       sum(CASE WHEN served_by = 'teacher' AND confidence IS NOT NULL THEN 1 ELSE 0 END),
       sum(CASE WHEN status != 200 THEN 1 ELSE 0 END),
       coalesce(sum(cost_usd), 0), coalesce(sum(counterfactual_usd), 0),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
FROM exchanges WHERE {{where}}
GROUP BY route, h
ON CONFLICT (route, hour) DO UPDATE SET
    requests = stats_hourly.requests + excluded.requests, ok = stats_hourly.ok + excluded.ok,
    student = stats_hourly.student + excluded.student, escalated = stats_hourly.escalated + excluded.escalated,
    errors = stats_hourly.errors + excluded.errors, cost_usd = stats_hourly.cost_usd + excluded.cost_usd,
    counterfactual_usd = stats_hourly.counterfactual_usd + excluded.counterfactual_usd,
    prompt_tokens = stats_hourly.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = stats_hourly.completion_tokens + excluded.completion_tokens""",
            f"""INSERT INTO stats_latency (route, day, served_by, bucket, n)
SELECT route, {day} AS d, served_by, {d.latency_bucket("latency_ms")} AS b, count(*)
FROM exchanges WHERE ({{where}}) AND status = 200 AND latency_ms IS NOT NULL
GROUP BY route, d, served_by, b
ON CONFLICT (route, day, served_by, bucket) DO UPDATE SET n = stats_latency.n + excluded.n""",
        ]
    hour = d.floor_div("ts", 3600)
    return [f"""INSERT INTO stats_shadow (route, hour, student_version, checks, agree, cost_usd)
SELECT route, {hour} AS h, coalesce(student_version, 0), count(*),
       coalesce(sum(agree), 0), coalesce(sum(cost_usd), 0)
FROM shadow_checks WHERE {{where}}
GROUP BY route, h, coalesce(student_version, 0)
ON CONFLICT (route, hour, student_version) DO UPDATE SET
    checks = stats_shadow.checks + excluded.checks, agree = stats_shadow.agree + excluded.agree,
    cost_usd = stats_shadow.cost_usd + excluded.cost_usd"""]


# PostgreSQL hands out ids when a row is inserted, and transactions commit in any order: a row with
# a lower id can become visible after a higher one was rolled up. The ids missing below the
# watermark ("holes") are remembered and folded in when their rows appear; a hole older than this
# is a rolled-back insert (ids are never reused) and is forgotten.
HOLE_TTL_S = 600.0
_ROLLUP_LOCK = 0x6B64726C  # "kdrl": one rollup catch-up at a time across replicas


def latency_bucket(latency_ms: float | None) -> int:
    """The histogram bucket of a latency (10% wide, log scale)."""
    if latency_ms is None or latency_ms <= _LAT_BASE_MS:
        return 0
    b = math.ceil(math.log(latency_ms / _LAT_BASE_MS) / math.log(_LAT_RATIO) - 1e-9)
    return max(1, min(LATENCY_MAX_BUCKET, b))


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


class Rollups:
    """The rollups of one ledger. Thread-safe; cheap to keep for the app's lifetime."""

    def __init__(self, ledger: Any, *, min_interval_s: float = 0.0):
        self.ledger = ledger
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._last_refresh = 0.0

    def _conn(self) -> Any:
        conn = self.ledger.conn
        conn.create_function("kd_latency_bucket", 1, latency_bucket, deterministic=True)
        return conn

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._conn().execute(sql, params).fetchall()

    # -- maintenance ------------------------------------------------------------------------
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
            folded = self._catch_up("exchanges")
            folded += self._catch_up("shadow_checks")
            self._last_refresh = time.monotonic()
        if folded:
            log.debug("stats rollups: folded %d rows", folded)
        return folded

    def _catch_up(self, source: str) -> int:
        conn = self._conn()
        postgres = conn.dialect.name == "postgresql"
        statements = _statements(conn.dialect, source)
        top = int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {source}").fetchone()[0])
        folded = 0
        while True:
            conn.execute(conn.dialect.begin_write)
            try:
                if postgres:
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (_ROLLUP_LOCK,))
                    folded += self._fold_holes(conn, source, statements)
                row = conn.execute("SELECT last_id FROM stats_watermark WHERE source = ?", (source,)).fetchone()
                last = int(row[0]) if row else 0
                if last >= top:
                    conn.execute("COMMIT")
                    return folded
                upto = min(top, last + CHUNK_ROWS)
                for sql in statements:
                    conn.execute(sql.format(where="id > ? AND id <= ?"), (last, upto))
                if postgres:
                    conn.execute(
                        f"INSERT INTO stats_holes (source, id, seen) SELECT ?, g, ? FROM generate_series(?::bigint + 1, ?::bigint) g"
                        f" WHERE NOT EXISTS (SELECT 1 FROM {source} s WHERE s.id = g) ON CONFLICT DO NOTHING",
                        (source, time.time(), last, upto))
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

    def _fold_holes(self, conn: Any, source: str, statements: list[str]) -> int:
        """Fold the rows that appeared where ids were missing below the watermark (PostgreSQL)."""
        conn.execute("DELETE FROM stats_holes WHERE source = ? AND seen < ?", (source, time.time() - HOLE_TTL_S))
        found = [int(r[0]) for r in conn.execute(
            f"SELECT h.id FROM stats_holes h JOIN {source} s ON s.id = h.id WHERE h.source = ?", (source,))]
        if not found:
            return 0
        marks = ", ".join("?" * len(found))
        for sql in statements:
            conn.execute(sql.format(where=f"id IN ({marks})"), found)
        conn.execute(f"DELETE FROM stats_holes WHERE source = ? AND id IN ({marks})", [source, *found])
        return len(found)

    def rebuild(self) -> int:
        """Drop and rebuild every rollup from the ledger (after a route rename, say)."""
        with self._lock, self.ledger.transaction() as conn:
            for table in ("stats_hourly", "stats_latency", "stats_shadow", "stats_watermark", "stats_holes"):
                conn.execute(f"DELETE FROM {table}")
        return self.refresh(force=True)

    # -- reads: sums --------------------------------------------------------------------------
    def totals(self, since: float | None = None, until: float | None = None) -> dict[str, float]:
        """Sums over the range: requests, student, escalated, errors, cost_usd, counterfactual_usd,
        prompt_tokens, completion_tokens, and the shadow checks' checks, agree and check_cost_usd."""
        where, params = _range("hour", since, until)
        r = self._rows(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(student), 0), coalesce(sum(escalated), 0), coalesce(sum(errors), 0), coalesce(sum(cost_usd), 0),"
            f" coalesce(sum(counterfactual_usd), 0), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM stats_hourly{where}",
            params,
        )[0]
        s = self._rows(f"SELECT coalesce(sum(checks), 0), coalesce(sum(agree), 0), coalesce(sum(cost_usd), 0) FROM stats_shadow{where}", params)[0]
        return {
            "requests": int(r[0]), "student": int(r[1]), "escalated": int(r[2]), "errors": int(r[3]),
            "cost_usd": float(r[4]), "counterfactual_usd": float(r[5]), "prompt_tokens": int(r[6]),
            "completion_tokens": int(r[7]), "checks": int(s[0]), "agree": int(s[1]), "check_cost_usd": float(s[2]),
        }

    def series(self, *, width: int, since: float | None) -> list[dict[str, float]]:
        """Per bucket of ``width`` seconds: t, requests, student, escalated, cost_usd,
        counterfactual_usd, check_cost_usd (oldest first)."""
        where, params = _range("hour", since, None)
        by_t: dict[int, dict[str, Any]] = {}

        def point(t: int) -> dict[str, Any]:
            return by_t.setdefault(t, {"t": t, "requests": 0, "student": 0, "escalated": 0, "cost_usd": 0.0,
                                       "counterfactual_usd": 0.0, "check_cost_usd": 0.0})

        for row in self._rows(
            f"SELECT (hour / {int(width)}) * {int(width)} AS t, coalesce(sum(requests), 0), coalesce(sum(student), 0), coalesce(sum(escalated), 0),"
            f" coalesce(sum(cost_usd), 0), coalesce(sum(counterfactual_usd), 0) FROM stats_hourly{where} GROUP BY t ORDER BY t",
            params,
        ):
            p = point(int(row[0]))
            p.update(requests=int(row[1]), student=int(row[2]), escalated=int(row[3]), cost_usd=float(row[4]),
                     counterfactual_usd=float(row[5]))
        for row in self._rows(
            f"SELECT (hour / {int(width)}) * {int(width)} AS t, coalesce(sum(cost_usd), 0) FROM stats_shadow{where} GROUP BY t", params
        ):
            point(int(row[0]))["check_cost_usd"] += float(row[1])
        return [by_t[t] for t in sorted(by_t)]

    def by_route(self, since: float | None = None) -> dict[str, dict[str, float]]:
        """Per route: requests, student, escalated, errors, cost_usd, counterfactual_usd."""
        where, params = _range("hour", since, None)
        return {
            r[0]: {"requests": int(r[1]), "student": int(r[2]), "escalated": int(r[3]), "errors": int(r[4]),
                   "cost_usd": float(r[5]), "counterfactual_usd": float(r[6])}
            for r in self._rows(
                "SELECT route, coalesce(sum(requests), 0), coalesce(sum(student), 0), coalesce(sum(escalated), 0), coalesce(sum(errors), 0), coalesce(sum(cost_usd), 0),"
                f" coalesce(sum(counterfactual_usd), 0) FROM stats_hourly{where} GROUP BY route",
                params,
            )
        }

    def checks_by_version(self, since: float | None = None, *, route: str | None = None) -> list[dict[str, Any]]:
        """Shadow checks per (route, student_version): checks, agree, check_cost_usd."""
        where, params = _range("hour", since, None)
        if route is not None:
            where = (where + " AND" if where else " WHERE") + " route = ?"
            params = [*params, route]
        return [
            {"route": r[0], "student_version": int(r[1]), "checks": int(r[2]), "agree": int(r[3]), "check_cost_usd": float(r[4])}
            for r in self._rows(
                f"SELECT route, student_version, coalesce(sum(checks), 0), coalesce(sum(agree), 0), coalesce(sum(cost_usd), 0) FROM stats_shadow{where}"
                " GROUP BY route, student_version",
                params,
            )
        ]

    def latency_histograms(self, since: float | None = None) -> dict[tuple[str, str], dict[int, int]]:
        """Per (route, served_by): the latency histogram {bucket: count} of the days since ``since``."""
        where, params = _range("day", float(int(since // 86400) * 86400) if since is not None else None, None)
        hist: dict[tuple[str, str], dict[int, int]] = {}
        for r in self._rows(
            f"SELECT route, served_by, bucket, coalesce(sum(n), 0) FROM stats_latency{where} GROUP BY route, served_by, bucket",
            params,
        ):
            hist.setdefault((r[0], r[1]), {})[int(r[2])] = int(r[3])
        return hist
