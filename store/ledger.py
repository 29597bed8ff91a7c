"""The store's read API and the writes that are not on the request path (SQLite backend).

The gateway writes exchanges through :class:`store.writer.LedgerWriter` (batched, off the event
loop); everything else reads and writes through :class:`Ledger`: the distiller, the admin API, the
dashboard, the CLI. No other module holds SQL.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from store.db import PgConnection, is_postgres, redact, sqlite_path
from store.migrate import migrate
from store.sqlite import connect
from store.types import Pair, StudentRefused

log = logging.getLogger(__name__)

__all__ = ["Ledger", "CHAT_ENDPOINTS"]

# The endpoints whose exchanges are chat in the ledger (every surface logs its request and answer in
# chat form), so each is a training pair; embeddings are not.
CHAT_ENDPOINTS: tuple[str, ...] = ("chat.completions", "responses", "messages", "completions")
CHAT_ENDPOINTS_SQL = "(" + ", ".join(f"'{e}'" for e in CHAT_ENDPOINTS) + ")"


class Ledger:
    """Read access to the ledger, plus the few writes that are not on the request path.

    Safe to share between threads: each thread gets its own connection.
    """

    def __init__(self, url: str | Path):
        self.url = str(url)
        self.postgres = is_postgres(self.url)
        # the SQLite file (None on PostgreSQL); artifacts default beside it
        self.path: str | None = None if self.postgres else sqlite_path(self.url)
        self._local = threading.local()
        self._pg: PgConnection | None = None
        if self.postgres:
            self._pg = PgConnection(self.url)
            migrate(self._pg)
        else:
            conn = connect(self.path)
            try:
                migrate(conn)
            finally:
                conn.close()

    @property
    def conn(self) -> Any:
        """This thread's connection (SQLite), or the shared pooled one (PostgreSQL)."""
        if self._pg is not None:
            return self._pg
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @property
    def dialect(self) -> Any:
        return self.conn.dialect

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """One write transaction (SQLite takes its write lock at once): all of it or none of it.
        Nested uses join the outer transaction."""
        conn = self.conn
        depth = getattr(self._local, "tx_depth", 0)
        if depth:
            self._local.tx_depth = depth + 1
            try:
                yield conn
            finally:
                self._local.tx_depth = depth
            return
        conn.execute(conn.dialect.begin_write)
        self._local.tx_depth = 1
        try:
            yield conn
        except BaseException:
            self._local.tx_depth = 0
            conn.execute("ROLLBACK")
            raise
        self._local.tx_depth = 0
        conn.execute("COMMIT")

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
            self._pg = None
            return
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def describe(self) -> str:
        """The backend and where it is, without secrets (a DSN's password is redacted)."""
        return f"{'PostgreSQL' if self.postgres else 'SQLite'} {redact(self.url)}"

    # -- generic (this module's own; no SQL is taken from callers) ---------------------------
    def _query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    def _scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # -- change generations -------------------------------------------------------------------
    def _bump(self, name: str) -> None:
        """Count a change to ``name`` ("routes", "keys", "students"), inside the caller's transaction."""
        self.conn.execute(
            "INSERT INTO generations (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = generations.value + 1", (name,))

    def touch(self, *names: str) -> None:
        """Tell every process that holds copies of ``names`` ("routes", "keys", "students") to reload."""
        with self.transaction():
            for name in names:
                self._bump(name)

    def generations(self) -> dict[str, int]:
        """How many changes routes, keys and students have seen: a process that holds copies of them
        (a gateway, one of several replicas) reloads when a number moves. One cheap query."""
        return {r[0]: int(r[1]) for r in self.conn.execute("SELECT name, value FROM generations")}

    _TABLES = frozenset({"exchanges", "shadow_checks", "routes", "students", "route_events", "api_keys", "embeddings"})

    def insert_rows(self, table: str, rows: Iterable[dict[str, Any]], *, fast: bool = False, batch: int = 20_000) -> int:
        """Bulk-insert ``rows`` (dicts of column values, JSON columns already text) into ``table``:
        seeding benchmarks, copying a ledger, fixtures. ``fast`` skips fsync while it runs (a crash
        midway loses the import, never older data). Returns how many rows were written."""
        if table not in self._TABLES:
            raise ValueError(f"insert_rows: unknown table {table!r}")
        conn = self.conn
        written = 0
        fast = fast and not self.postgres  # PostgreSQL commits in batches anyway
        if fast:
            conn.execute("PRAGMA synchronous=OFF")
        try:
            pending: list[dict[str, Any]] = []

            def flush() -> None:
                nonlocal written
                by_cols: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
                for row in pending:
                    cols = tuple(row)
                    by_cols.setdefault(cols, []).append(tuple(row[c] for c in cols))
                with self.transaction():
                    for cols, values in by_cols.items():
                        conn.executemany(
                            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
                written += len(pending)
                pending.clear()

            for row in rows:
                pending.append(row)
                if len(pending) >= batch:
                    flush()
            if pending:
                flush()
        finally:
            if fast:
                conn.execute("PRAGMA synchronous=NORMAL")
        if self.postgres and written and table in self._IDENTITY:
            self._advance_identity(table)
        return written

    _IDENTITY = frozenset({"exchanges", "shadow_checks", "students", "route_events"})

    def _advance_identity(self, table: str) -> None:
        """After rows were inserted with their ids (a copy), new rows must get ids above them."""
        self.conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT coalesce(max(id), 0) + 1 FROM {table}), false)")

    def integrity_check(self) -> list[str]:
        """``["ok"]``, or what is wrong: SQLite's integrity check; on PostgreSQL, that the server
        answers and the schema is the one this kdgate migrates to."""
        if not self.postgres:
            return [str(r[0]) for r in self.conn.execute("PRAGMA integrity_check").fetchall()]
        from store.migrate import pending_migrations

        pending = pending_migrations(self.conn)
        return ["ok"] if not pending else [f"migrations not applied: {', '.join(pending)}"]

    def table_counts(self) -> dict[str, int]:
        """Rows per table (``kdgate db copy`` compares them; ``kdgate db check`` shows them)."""
        return {t: int(self._scalar(f"SELECT count(*) FROM {t}")) for t in sorted(self._TABLES | {"generations"})}

    def table_rows(self, table: str, *, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every row of ``table`` in key order, as dicts (``kdgate db copy`` reads through this)."""
        if table not in self._TABLES:
            raise ValueError(f"table_rows: unknown table {table!r}")
        key = {"routes": "name", "api_keys": "id", "embeddings": "exchange_id, model"}.get(table, "id")
        offset = 0
        while True:
            rows = self._query(f"SELECT * FROM {table} ORDER BY {key} LIMIT ? OFFSET ?", (batch, offset))
            if not rows:
                return
            yield from rows
            offset += len(rows)

    # -- exchanges --------------------------------------------------------------------------
    def exchange(self, uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM exchanges WHERE uid = ?", (uid,))
        return rows[0] if rows else None

    def exchange_ids(self, uids: Sequence[str]) -> dict[str, int]:
        """uid -> id of the exchanges among ``uids`` (those not written yet are absent)."""
        out: dict[str, int] = {}
        uids = list(uids)
        for i in range(0, len(uids), 500):
            chunk = uids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            out.update({str(r[0]): int(r[1]) for r in self.conn.execute(
                f"SELECT uid, id FROM exchanges WHERE uid IN ({marks})", tuple(chunk)).fetchall()})
        return out

    def count_exchanges(
        self, route: str | None = None, *, since_id: int = 0, served_by: str | None = None, status: int | None = None,
        endpoint: str | None = None,
    ) -> int:
        """Exchanges (of a route), after id ``since_id``, optionally by who served them, status and endpoint."""
        clauses, params = ["id > ?"], [since_id]
        for col, value in (("route", route), ("served_by", served_by), ("status", status), ("endpoint", endpoint)):
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        return int(self._scalar("SELECT count(*) FROM exchanges WHERE " + " AND ".join(clauses), params))

    def exchange_counts(self) -> dict[str, int]:
        """Exchanges per route."""
        return {r[0]: int(r[1]) for r in self.conn.execute("SELECT route, count(*) FROM exchanges GROUP BY route ORDER BY route")}

    def routes_with_teacher_pairs(self) -> list[str]:
        """Routes the teacher answered at least once (configured or discovered), by name."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT route FROM exchanges WHERE served_by = 'teacher' AND status = 200 ORDER BY route")]

    def exchange_rows(
        self, route: str, *, columns: Sequence[str], served_by: str | None = None, status: int | None = None,
    ) -> list[dict[str, Any]]:
        """``columns`` of a route's exchanges in id order, optionally by who served them and status."""
        from store.schema import EXCHANGE_COLUMNS

        bad = [c for c in columns if c not in EXCHANGE_COLUMNS]
        if bad:
            raise ValueError(f"exchange_rows: unknown column(s) {bad}")
        clauses, params = ["route = ?"], [route]
        for col, value in (("served_by", served_by), ("status", status)):
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        return self._query(f"SELECT {', '.join(columns)} FROM exchanges WHERE {' AND '.join(clauses)} ORDER BY id", params)

    def uids(self) -> set[str]:
        """The uid of every exchange."""
        return {r[0] for r in self.conn.execute("SELECT uid FROM exchanges")}

    def teacher_pairs(
        self, route: str, *, since_id: int = 0, limit: int | None = None, shadow_checks: bool = False
    ) -> Iterator[Pair]:
        """Successful teacher answers of a route, oldest first.

        Only exchanges the teacher answered with status 200 and a text answer; the caller filters
        refusals and truncations (it knows the route's task). With ``shadow_checks``, also the
        teacher's answers to sampled student-served requests, each weighted by the inverse of its
        student version's measured check rate, so that the pairs together stand for the traffic:
        in cascade mode the teacher-answered pairs alone are the escalations, the hardest requests.
        """
        keys = self.training_keys(route)
        key_filter = f" AND key_id IN ({','.join('?' * len(keys))})" if keys is not None else ""
        sql = (
            "SELECT id, ts, route, request, answer, finish_reason, teacher_logprobs, served_by "
            "FROM exchanges WHERE route = ? AND id > ? AND status = 200 AND served_by = 'teacher' "
            f"AND endpoint IN {CHAT_ENDPOINTS_SQL} AND answer IS NOT NULL" + key_filter + " ORDER BY id"
        )
        params: list[Any] = [route, since_id, *(keys or [])]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        pairs = [
            Pair(
                id=row["id"],
                ts=row["ts"],
                route=row["route"],
                messages=json.loads(row["request"]).get("messages", []),
                answer=row["answer"],
                finish_reason=row["finish_reason"],
                teacher_logprobs=json.loads(row["teacher_logprobs"]) if row["teacher_logprobs"] else None,
                served_by=row["served_by"],
            )
            for row in self.conn.execute(sql, params)
        ]
        if shadow_checks:
            checked = self._checked_pairs(route, since_id)
            if keys is not None:
                allowed = set(keys)
                owners = self._key_ids_of([p.id for p in checked])
                checked = [p for p in checked if owners.get(p.id) in allowed]
            pairs = sorted(pairs + checked, key=lambda p: p.id)
            if limit is not None:
                pairs = pairs[:limit]
        yield from pairs

    def training_keys(self, route: str) -> list[str] | None:
        """The key ids whose traffic may train ``route``'s students: None for every key's (the
        default), else the ids of the route's ``allowed_keys`` when ``train_on_allowed_keys_only``."""
        row = self.route(route)
        settings = (row or {}).get("settings") or {}
        allowed = settings.get("allowed_keys")
        if not settings.get("train_on_allowed_keys_only") or allowed is None:
            return None
        names = [str(a) for a in allowed]
        if not names:
            return []
        marks = ",".join("?" * len(names))
        ids = {r[0] for r in self.conn.execute(
            f"SELECT id FROM api_keys WHERE id IN ({marks}) OR name IN ({marks})", [*names, *names])}
        return sorted(ids)

    def _key_ids_of(self, ids: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            out.update(dict(self.conn.execute(
                f"SELECT id, key_id FROM exchanges WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()))
        return out

    def _checked_pairs(self, route: str, since_id: int) -> list[Pair]:
        """Student-served exchanges the teacher also answered (shadow checks), as weighted pairs."""
        served = dict(self.conn.execute(
            "SELECT student_version, count(*) FROM exchanges WHERE route = ? AND served_by = 'student' "
            "AND status = 200 GROUP BY student_version", (route,)).fetchall())
        rows = self.conn.execute(
            "SELECT e.id, e.ts, e.request, e.student_version, s.teacher_answer FROM shadow_checks s "
            "JOIN exchanges e ON e.uid = s.exchange_uid WHERE s.route = ? AND e.route = ? AND e.id > ? "
            f"AND e.served_by = 'student' AND e.status = 200 AND e.endpoint IN {CHAT_ENDPOINTS_SQL} "
            "AND s.teacher_answer IS NOT NULL ORDER BY e.id", (route, route, since_id)).fetchall()
        checked = Counter(row["student_version"] for row in rows)
        return [
            Pair(
                id=row["id"],
                ts=row["ts"],
                route=route,
                messages=json.loads(row["request"]).get("messages", []),
                answer=row["teacher_answer"],
                finish_reason=None,
                teacher_logprobs=None,
                served_by="student",
                weight=max(1.0, served.get(row["student_version"], 0) / checked[row["student_version"]]),
            )
            for row in rows
        ]

    def teacher_spend_since(self, route: str, since_ts: float) -> float:
        """Dollars the route's teacher answers cost since ``since_ts`` (what a student could save)."""
        return float(self._scalar(
            "SELECT coalesce(sum(cost_usd), 0) FROM exchanges WHERE route = ? AND served_by = 'teacher' AND ts >= ?",
            (route, since_ts)) or 0.0)

    def check_probabilities(self, route: str) -> dict[int, tuple[int | None, float]]:
        """Exchange id -> (student version, probability it was checked with) of the route's shadow
        checks that recorded one (checks sampled by confidence; see router.certify)."""
        rows = self.conn.execute(
            "SELECT e.id, e.student_version, s.sample_prob FROM shadow_checks s JOIN exchanges e ON e.uid = s.exchange_uid "
            "WHERE s.route = ? AND e.route = ? AND s.sample_prob IS NOT NULL", (route, route)).fetchall()
        return {int(r[0]): (r[1], float(r[2])) for r in rows}

    def max_exchange_id(self, route: str | None = None) -> int:
        if route is None:
            return int(self._scalar("SELECT coalesce(max(id), 0) FROM exchanges"))
        return int(
            self._scalar("SELECT coalesce(max(id), 0) FROM exchanges WHERE route = ?", (route,))
        )

    # -- embeddings -------------------------------------------------------------------------
    def embeddings(self, ids: Iterable[int], model: str) -> dict[int, bytes]:
        ids = list(ids)
        out: dict[int, bytes] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT exchange_id, vector FROM embeddings WHERE model = ? AND exchange_id IN ({marks})",
                [model, *chunk],
            ):
                out[row[0]] = row[1]
        return out

    def put_embeddings(self, model: str, vectors: dict[int, bytes], dim: int) -> None:
        with self.transaction():
            self.conn.executemany(
                "INSERT INTO embeddings (exchange_id, model, dim, vector) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (exchange_id, model) DO UPDATE SET dim = excluded.dim, vector = excluded.vector",
                [(i, model, dim, v) for i, v in vectors.items()],
            )

    # -- routes -----------------------------------------------------------------------------
    def routes(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM routes ORDER BY name")
        for r in rows:
            r["settings"] = json.loads(r["settings"] or "{}")
            r["template"] = json.loads(r["template"]) if r["template"] else None
        return rows

    def route(self, name: str) -> dict[str, Any] | None:
        rows = [r for r in self._query("SELECT * FROM routes WHERE name = ?", (name,))]
        if not rows:
            return None
        r = rows[0]
        r["settings"] = json.loads(r["settings"] or "{}")
        r["template"] = json.loads(r["template"]) if r["template"] else None
        return r

    def upsert_route(
        self,
        name: str,
        *,
        teacher_model: str,
        settings: dict[str, Any] | None = None,
        template: Any = None,
        origin: str = "auto",
    ) -> None:
        now = time.time()
        existing = self.route(name)
        with self.transaction():
            if existing is None:
                self.conn.execute(
                    "INSERT INTO routes (name, teacher_model, settings, template, origin, created, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        teacher_model,
                        json.dumps(settings or {}),
                        json.dumps(template) if template is not None else None,
                        origin,
                        now,
                        now,
                    ),
                )
            else:
                merged = {**existing["settings"], **(settings or {})}
                self.conn.execute(
                    "UPDATE routes SET teacher_model = ?, settings = ?, template = coalesce(?, template),"
                    " updated = ? WHERE name = ?",
                    (
                        teacher_model,
                        json.dumps(merged),
                        json.dumps(template) if template is not None else None,
                        now,
                        name,
                    ),
                )
            self._bump("routes")

    def add_route(self, name: str, *, teacher_model: str, template: dict[str, Any] | None, origin: str) -> None:
        """Add a route with empty settings unless one of that name exists."""
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO routes (name, teacher_model, settings, template, origin, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (name, teacher_model, "{}", json.dumps(template) if template else None, origin, now, now),
            )
            self._bump("routes")

    def claim_route_change(
        self, name: str, *, expect: dict[str, Any], changes: dict[str, Any], event: str, actor: str, detail: Any,
        baseline: dict[str, Any] | None = None,
    ) -> bool:
        """Apply ``changes`` to a route's settings and record ``event``, only if its stored settings
        still say ``expect`` (all in one transaction, the route's row locked): of several replicas
        making the same decision, exactly one records it. Returns whether this call did."""
        with self.transaction() as conn:
            lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
            row = conn.execute(f"SELECT settings FROM routes WHERE name = ?{lock}", (name,)).fetchone()
            current = json.loads(row[0] or "{}") if row else {}
            effective = {**(baseline or {}), **current}  # what the stored settings mean (defaults beneath)
            if any(effective.get(k, False if isinstance(v, bool) else None) != v for k, v in expect.items()):
                return False
            conn.execute("UPDATE routes SET settings = ?, updated = ? WHERE name = ?",
                         (json.dumps({**current, **changes}), time.time(), name))
            self._bump("routes")
            conn.execute("INSERT INTO route_events (ts, route, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
                         (time.time(), name, event, actor, json.dumps(detail) if detail is not None else None))
        return True

    def rename_route(self, old: str, new: str) -> None:
        with self.transaction():
            self.conn.execute("UPDATE routes SET name = ?, updated = ? WHERE name = ?", (new, time.time(), old))
            for table in ("exchanges", "students", "route_events", "shadow_checks"):
                self.conn.execute(f"UPDATE {table} SET route = ? WHERE route = ?", (new, old))
            self._bump("routes")

    def record_event(self, route: str, kind: str, *, actor: str = "system", detail: Any = None) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT INTO route_events (ts, route, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), route, kind, actor, json.dumps(detail) if detail is not None else None),
            )

    # -- student registry ------------------------------------------------------------------
    def student_row(self, route: str, version: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM students WHERE route = ? AND version = ?", (route, version))
        return rows[0] if rows else None

    def set_live_student(
        self, route: str, version: int, *, actor: str, reason: str = "", event: str = "student.promoted",
        verify: Callable[[dict[str, Any]], Any] | None = None,
    ) -> dict[str, Any]:
        """Make ``version`` the route's live student and retire the current one, in one transaction,
        recorded as ``event``; returns the version's row. ``verify(row)`` runs first and refuses by
        raising: the artifact's checksum check, which the callers (``distiller.registry.promote``, the
        dashboard's promote/rollback) pass in, since this module imports nothing of ours. An unknown
        version or a refusal raises :class:`StudentRefused` and changes nothing."""
        row = self.student_row(route, version)
        if row is None:
            known = [r["version"] for r in self._query("SELECT version FROM students WHERE route = ? ORDER BY version", (route,))]
            raise StudentRefused(f"Route {route!r} has no student version {version} (versions: {known or 'none'}).")
        if verify is not None:
            try:
                verify(row)
            except Exception as exc:
                raise StudentRefused(f"Refusing to make version {version} of {route!r} live: {exc}") from exc
        previous = self._scalar(
            "SELECT version FROM students WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1", (route,))
        with self.transaction():
            self.conn.execute(
                "UPDATE students SET status = 'retired' WHERE route = ? AND status = 'live' AND version != ?",
                (route, version),
            )
            self.conn.execute("UPDATE students SET status = 'live' WHERE route = ? AND version = ?", (route, version))
            self._bump("students")
        self.record_event(route, event, actor=actor, detail={"version": version, "previous": previous, "reason": reason})
        return self.student_row(route, version) or row

    @staticmethod
    def _student(row: Any) -> dict[str, Any]:
        out = dict(row)
        for col, empty in (("metrics", "{}"), ("curve", "[]"), ("calibration", "{}")):
            if col in out:
                out[col] = json.loads(out[col] or empty)
        return out

    def live_students(self) -> list[dict[str, Any]]:
        """Every route's live version: route, version, kind, checksum, artifact_path, metrics, curve, val_pairs."""
        return [self._student(r) for r in self.conn.execute(
            "SELECT route, version, kind, checksum, artifact_path, metrics, curve, val_pairs FROM students"
            " WHERE status = 'live' ORDER BY route")]

    def live_student(self, route: str) -> dict[str, Any] | None:
        """The route's live version (as :meth:`live_students` gives it), or None."""
        row = self.conn.execute(
            "SELECT route, version, kind, checksum, artifact_path, metrics, curve, val_pairs FROM students"
            " WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1", (route,)).fetchone()
        return self._student(row) if row else None

    def student_versions(self, route: str) -> list[dict[str, Any]]:
        """Every version of a route, newest first: version, kind, status, created, train_pairs,
        val_pairs, metrics."""
        return [self._student(r) for r in self.conn.execute(
            "SELECT version, kind, status, created, train_pairs, val_pairs, metrics FROM students"
            " WHERE route = ? ORDER BY version DESC", (route,))]

    def token_ratios(self, route: str, *, newest: int = 2000) -> dict[str, float | None]:
        """Sums over the route's newest teacher answers with usage: prompt_tokens, prompt_chars,
        completion_tokens, completion_chars (what prices a student answer's counterfactual)."""
        row = self.conn.execute(
            "SELECT sum(prompt_tokens), sum(length(request)), sum(completion_tokens), sum(length(answer)) "
            "FROM (SELECT prompt_tokens, request, completion_tokens, answer FROM exchanges "
            "WHERE route = ? AND served_by = 'teacher' AND status = 200 AND prompt_tokens > 0 AND completion_tokens > 0 "
            "ORDER BY id DESC LIMIT ?) AS recent", (route, newest)).fetchone()
        return {"prompt_tokens": row[0], "prompt_chars": row[1], "completion_tokens": row[2], "completion_chars": row[3]}

    def recent_exchanges(self, route: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """The route's latest exchanges, newest first: uid, ts, served_by, status, latency_ms, cost_usd,
        counterfactual_usd, student_version, confidence, answer, error, messages, and ``shadow``
        (the check's student_answer, teacher_answer and agree) where one was made."""
        rows = self.conn.execute(
            "SELECT e.uid, e.ts, e.served_by, e.status, e.latency_ms, e.cost_usd, e.counterfactual_usd,"
            " e.student_version, e.confidence, e.request, e.answer, e.error, s.student_answer AS shadow_student_answer,"
            " s.teacher_answer AS shadow_teacher_answer, s.agree AS shadow_agree"
            " FROM (SELECT * FROM exchanges WHERE route = ? ORDER BY ts DESC LIMIT ?) e"
            " LEFT JOIN shadow_checks s ON s.exchange_uid = e.uid ORDER BY e.ts DESC",
            (route, limit),
        ).fetchall()
        out = []
        for row in rows:
            r = dict(row)
            try:
                messages = json.loads(r.pop("request") or "{}").get("messages") or []
            except (ValueError, AttributeError):
                messages = []
            student, teacher, agree = r.pop("shadow_student_answer"), r.pop("shadow_teacher_answer"), r.pop("shadow_agree")
            r["shadow"] = None if agree is None else {"student_answer": student, "teacher_answer": teacher, "agree": bool(agree)}
            r["messages"] = messages
            out.append(r)
        return out

    def max_event_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM route_events").fetchone()[0])

    def events_since(self, last_id: int, kind: str) -> list[dict[str, Any]]:
        """Events of ``kind`` after id ``last_id``, oldest first: id, route, detail (decoded)."""
        out = []
        for row in self.conn.execute(
            "SELECT id, route, detail FROM route_events WHERE id > ? AND kind = ? ORDER BY id", (last_id, kind)
        ):
            try:
                detail = json.loads(row[2]) if row[2] else {}
            except ValueError:
                detail = None
            out.append({"id": int(row[0]), "route": row[1], "detail": detail})
        return out

    def events(self, route: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT * FROM route_events WHERE route = ? ORDER BY id DESC LIMIT ?", (route, limit)
        )
        for r in rows:
            r["detail"] = json.loads(r["detail"]) if r["detail"] else None
        return rows

    # -- stored responses (the Responses API) ------------------------------------------------------
    def put_response(self, response_id: str, *, key_id: str, route: str | None, items: str, response: str,
                     ts: float, expires: float) -> None:
        """Store a Responses object and its conversation (JSON text) now, replacing one of the same
        id. The gateway queues them through the writer instead (:meth:`LedgerWriter.put_response`)
        and uses this only when the writer's queue is full."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO responses (id, key_id, route, ts, expires, items, response) VALUES (?, ?, ?, ?, ?, ?, ?)"
                         " ON CONFLICT (id) DO UPDATE SET key_id = excluded.key_id, route = excluded.route, ts = excluded.ts,"
                         " expires = excluded.expires, items = excluded.items, response = excluded.response",
                         (response_id, key_id, route, ts, expires, items, response))

    def stored_response(self, response_id: str, *, key_id: str, now: float) -> dict[str, Any] | None:
        """A stored response of this key that has not expired (another key's is not found)."""
        row = self.conn.execute("SELECT route, ts, items, response FROM responses WHERE id = ? AND key_id = ? AND expires >= ?",
                                (response_id, key_id, now)).fetchone()
        return dict(row) if row else None

    def delete_response(self, response_id: str, *, key_id: str) -> bool:
        with self.transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE id = ? AND key_id = ?", (response_id, key_id)).rowcount > 0

    # -- dashboard sessions -------------------------------------------------------------------
    def add_session(self, sid_hash: str, *, csrf: str, expires: float, admin_hash: str, keep: int, now: float) -> None:
        """Record a session (by its id's hash); expired ones go, and past ``keep`` the oldest."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            n = int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
            if n >= keep:
                conn.execute("DELETE FROM sessions WHERE sid_hash IN (SELECT sid_hash FROM sessions ORDER BY expires LIMIT ?)",
                             (n - keep + 1,))
            conn.execute("INSERT INTO sessions (sid_hash, csrf, expires, admin_hash) VALUES (?, ?, ?, ?)",
                         (sid_hash, csrf, expires, admin_hash))

    def session(self, sid_hash: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT csrf, expires, admin_hash FROM sessions WHERE sid_hash = ?", (sid_hash,)).fetchone()
        return dict(row) if row else None

    def drop_session(self, sid_hash: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE sid_hash = ?", (sid_hash,))

    # -- keys -------------------------------------------------------------------------------
    def add_key(self, key_id: str, name: str, key_hash: str) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT INTO api_keys (id, name, hash, created, revoked) VALUES (?, ?, ?, ?, NULL)",
                (key_id, name, key_hash, time.time()),
            )
            self._bump("keys")

    @staticmethod
    def _key_row(row: dict[str, Any]) -> dict[str, Any]:
        row["routes"] = json.loads(row["routes"]) if row.get("routes") else None
        return row

    def keys(self) -> list[dict[str, Any]]:
        return [self._key_row(r) for r in self._query(
            "SELECT id, name, created, revoked, rpm, tpm, budget_day_usd, budget_month_usd, routes FROM api_keys ORDER BY created"
        )]

    def key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT id, name, revoked, rpm, tpm, budget_day_usd, budget_month_usd, routes FROM api_keys WHERE hash = ?",
            (key_hash,),
        )
        return self._key_row(rows[0]) if rows else None

    def set_key_limits(self, key_id: str, limits: dict[str, Any]) -> bool:
        """Set (or clear, with None) a key's rpm, tpm, budget_day_usd, budget_month_usd and routes
        (the route names or globs it may use; None: every route)."""
        allowed = {"rpm", "tpm", "budget_day_usd", "budget_month_usd", "routes"}
        unknown = set(limits) - allowed
        if unknown:
            raise ValueError(f"unknown key limit(s): {sorted(unknown)}; known: {sorted(allowed)}")
        if not limits:
            return self._scalar("SELECT count(*) FROM api_keys WHERE id = ? OR name = ?", (key_id, key_id)) > 0
        values = {k: (json.dumps(list(v)) if k == "routes" and v is not None else v) for k, v in limits.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.transaction():
            cur = self.conn.execute(f"UPDATE api_keys SET {sets} WHERE id = ? OR name = ?", [*values.values(), key_id, key_id])
            self._bump("keys")
        return cur.rowcount > 0

    def key_spend_since(self, key_id: str, since: float) -> float:
        return float(self._scalar("SELECT coalesce(sum(cost_usd), 0) FROM exchanges WHERE key_id = ? AND ts >= ?", (key_id, since)))

    def revoke_key(self, key_id: str) -> bool:
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE (id = ? OR name = ?) AND revoked IS NULL",
                (time.time(), key_id, key_id),
            )
            self._bump("keys")
        return cur.rowcount > 0
