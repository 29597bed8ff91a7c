"""The ledger: every exchange the gateway handles, in one SQLite database.

This module imports no web code. The gateway writes through :class:`LedgerWriter` (a thread that owns
its own connection and commits in batches, so the event loop never waits on the disk); the distiller,
the admin API and the CLI read through :class:`Ledger` (the narrow store API).

Schema changes are named migrations, applied in order and recorded in ``_migrations``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

__all__ = ["Ledger", "LedgerWriter", "MIGRATIONS", "connect", "EXCHANGE_COLUMNS"]

# Columns of the ``exchanges`` table, in order. JSON columns hold text written with json.dumps.
EXCHANGE_COLUMNS: dict[str, type] = {
    "id": int,
    "uid": str,  # the response id returned to the client (also x-request-id)
    "ts": float,  # unix time the request arrived
    "route": str,
    "key_id": str,  # id of the gateway key used ("" without auth); never the key itself
    "endpoint": str,  # "chat.completions" | "embeddings"
    "model": str,  # what the client asked for
    "teacher_model": str,  # the litellm model string of the route's teacher
    "request": str,  # JSON: messages and parameters, as sent (no credentials)
    "response": str,  # JSON: the full OpenAI response body (streams are reassembled)
    "answer": str,  # the first choice's text content (what the distiller learns from)
    "finish_reason": str,
    "prompt_tokens": int,
    "completion_tokens": int,
    "cached_tokens": int,
    "reasoning_tokens": int,
    "cost_usd": float,  # what this exchange actually cost
    "counterfactual_usd": float,  # what the teacher alone would have cost
    "latency_ms": float,
    "status": int,  # HTTP status returned to the client
    "error": str,
    "served_by": str,  # "teacher" | "student"
    "student_version": int,
    "confidence": float,
    "teacher_logprobs": str,  # JSON: choices[0].logprobs.content as returned by the teacher
    "stream": int,
    "student_answer": str,  # what the student said (served, escalated or shadowed requests)
}


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["exchanges"].create(EXCHANGE_COLUMNS, pk="id", not_null={"uid", "ts", "route"})
    db["exchanges"].create_index(["uid"], unique=True)
    db["exchanges"].create_index(["route", "ts"])
    db["exchanges"].create_index(["ts"])
    db["routes"].create(
        {
            "name": str,
            "teacher_model": str,
            "settings": str,  # JSON: mode, threshold, target_agreement, shadow_rate, ...
            "template": str,  # JSON: the static template learned for automatic routes
            "origin": str,  # "config" | "auto" | "admin"
            "created": float,
            "updated": float,
        },
        pk="name",
    )
    db["api_keys"].create(
        {"id": str, "name": str, "hash": str, "created": float, "revoked": float},
        pk="id",
    )
    db["api_keys"].create_index(["hash"], unique=True)


def _m002_students(db: sqlite_utils.Database) -> None:
    db["embeddings"].create(
        {"exchange_id": int, "model": str, "dim": int, "vector": bytes},
        pk=("exchange_id", "model"),
    )
    db["students"].create(
        {
            "id": int,
            "route": str,
            "version": int,
            "kind": str,  # "label" | "structured" | "lm"
            "created": float,
            "train_pairs": int,
            "val_pairs": int,
            "metrics": str,  # JSON
            "curve": str,  # JSON: [{"threshold", "coverage", "agreement"}]
            "calibration": str,  # JSON
            "artifact_path": str,
            "checksum": str,
            "status": str,  # "candidate" | "live" | "retired"
        },
        pk="id",
    )
    db["students"].create_index(["route", "version"], unique=True)
    db["route_events"].create(
        {"id": int, "ts": float, "route": str, "kind": str, "actor": str, "detail": str},
        pk="id",
    )
    db["route_events"].create_index(["route", "ts"])
    db["shadow_checks"].create(
        {
            "id": int,
            "ts": float,
            "route": str,
            "exchange_uid": str,
            "student_version": int,
            "student_answer": str,
            "teacher_answer": str,
            "agree": int,
            "cost_usd": float,
        },
        pk="id",
    )
    db["shadow_checks"].create_index(["route", "ts"])


def _m003_student_answer(db: sqlite_utils.Database) -> None:
    if "student_answer" not in db["exchanges"].columns_dict:
        db["exchanges"].add_column("student_answer", str)
    db["exchanges"].create_index(["route", "served_by"], if_not_exists=True)


def _m004_key_limits(db: sqlite_utils.Database) -> None:
    cols = db["api_keys"].columns_dict
    for name, typ in (("rpm", int), ("tpm", int), ("budget_day_usd", float), ("budget_month_usd", float)):
        if name not in cols:
            db["api_keys"].add_column(name, typ)
    db["exchanges"].create_index(["key_id", "ts"], if_not_exists=True)


def _m005_key_scopes(db: sqlite_utils.Database) -> None:
    if "routes" not in db["api_keys"].columns_dict:
        db["api_keys"].add_column("routes", str)  # JSON list of route names or globs; NULL: every route


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_initial", _m001_initial),
    ("002_students", _m002_students),
    ("003_student_answer", _m003_student_answer),
    ("004_key_limits", _m004_key_limits),
    ("005_key_scopes", _m005_key_scopes),
]


def _private_file(path: Path) -> None:
    """Create the ledger file readable by its owner only (it holds every prompt and answer); SQLite
    gives its -wal and -shm files the database file's permissions."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the ledger with the pragmas every connection needs (WAL, busy timeout)."""
    path = str(path)
    if path != ":memory:" and not readonly:
        _private_file(Path(path))
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations this database has not seen yet; returns their names."""
    db = sqlite_utils.Database(conn)
    if "_migrations" not in db.table_names():
        db["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with conn:
            conn.execute("BEGIN")
            fn(db)
            db["_migrations"].insert({"name": name, "applied_at": time.time()})
        applied.append(name)
        log.info("ledger migration applied: %s", name)
    return applied


@dataclass(frozen=True)
class Pair:
    """One logged teacher exchange, as the distiller sees it."""

    id: int
    ts: float
    route: str
    messages: list[dict[str, Any]]
    answer: str
    finish_reason: str | None
    teacher_logprobs: list[dict[str, Any]] | None
    served_by: str
    # How many requests of the route's traffic this pair stands for: 1 for everything the teacher
    # answered (all of it is logged), 1/sampling rate for a shadow check of a student answer.
    weight: float = 1.0


class StudentRefused(Exception):
    """A student version cannot be made live: it does not exist, or its artifact failed verification."""


class Ledger:
    """Read access to the ledger, plus the few writes that are not on the request path.

    Safe to share between threads: each thread gets its own connection.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        conn = connect(self.path)
        migrate(conn)
        conn.close()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @property
    def db(self) -> sqlite_utils.Database:
        return sqlite_utils.Database(self.conn)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- generic ----------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # -- exchanges --------------------------------------------------------------------------
    def exchange(self, uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM exchanges WHERE uid = ?", (uid,))
        return rows[0] if rows else None

    def count_exchanges(self, route: str | None = None) -> int:
        if route is None:
            return int(self.scalar("SELECT count(*) FROM exchanges"))
        return int(self.scalar("SELECT count(*) FROM exchanges WHERE route = ?", (route,)))

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
            "AND endpoint = 'chat.completions' AND answer IS NOT NULL" + key_filter + " ORDER BY id"
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
            "AND e.served_by = 'student' AND e.status = 200 AND e.endpoint = 'chat.completions' "
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

    def max_exchange_id(self, route: str | None = None) -> int:
        if route is None:
            return int(self.scalar("SELECT coalesce(max(id), 0) FROM exchanges"))
        return int(
            self.scalar("SELECT coalesce(max(id), 0) FROM exchanges WHERE route = ?", (route,))
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
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO embeddings (exchange_id, model, dim, vector) VALUES (?, ?, ?, ?)",
                [(i, model, dim, v) for i, v in vectors.items()],
            )

    # -- routes -----------------------------------------------------------------------------
    def routes(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM routes ORDER BY name")
        for r in rows:
            r["settings"] = json.loads(r["settings"] or "{}")
            r["template"] = json.loads(r["template"]) if r["template"] else None
        return rows

    def route(self, name: str) -> dict[str, Any] | None:
        rows = [r for r in self.query("SELECT * FROM routes WHERE name = ?", (name,))]
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
        with self.conn:
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

    def rename_route(self, old: str, new: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE routes SET name = ?, updated = ? WHERE name = ?", (new, time.time(), old))
            for table in ("exchanges", "students", "route_events", "shadow_checks"):
                self.conn.execute(f"UPDATE {table} SET route = ? WHERE route = ?", (new, old))

    def record_event(self, route: str, kind: str, *, actor: str = "system", detail: Any = None) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO route_events (ts, route, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), route, kind, actor, json.dumps(detail) if detail is not None else None),
            )

    # -- student registry ------------------------------------------------------------------
    def student_row(self, route: str, version: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM students WHERE route = ? AND version = ?", (route, version))
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
            known = [r["version"] for r in self.query("SELECT version FROM students WHERE route = ? ORDER BY version", (route,))]
            raise StudentRefused(f"Route {route!r} has no student version {version} (versions: {known or 'none'}).")
        if verify is not None:
            try:
                verify(row)
            except Exception as exc:
                raise StudentRefused(f"Refusing to make version {version} of {route!r} live: {exc}") from exc
        previous = self.scalar(
            "SELECT version FROM students WHERE route = ? AND status = 'live' ORDER BY version DESC LIMIT 1", (route,))
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "UPDATE students SET status = 'retired' WHERE route = ? AND status = 'live' AND version != ?",
                (route, version),
            )
            self.conn.execute("UPDATE students SET status = 'live' WHERE route = ? AND version = ?", (route, version))
        self.record_event(route, event, actor=actor, detail={"version": version, "previous": previous, "reason": reason})
        return self.student_row(route, version) or row

    def events(self, route: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT * FROM route_events WHERE route = ? ORDER BY id DESC LIMIT ?", (route, limit)
        )
        for r in rows:
            r["detail"] = json.loads(r["detail"]) if r["detail"] else None
        return rows

    # -- keys -------------------------------------------------------------------------------
    def add_key(self, key_id: str, name: str, key_hash: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO api_keys (id, name, hash, created, revoked) VALUES (?, ?, ?, ?, NULL)",
                (key_id, name, key_hash, time.time()),
            )

    @staticmethod
    def _key_row(row: dict[str, Any]) -> dict[str, Any]:
        row["routes"] = json.loads(row["routes"]) if row.get("routes") else None
        return row

    def keys(self) -> list[dict[str, Any]]:
        return [self._key_row(r) for r in self.query(
            "SELECT id, name, created, revoked, rpm, tpm, budget_day_usd, budget_month_usd, routes FROM api_keys ORDER BY created"
        )]

    def key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        rows = self.query(
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
            return self.scalar("SELECT count(*) FROM api_keys WHERE id = ? OR name = ?", (key_id, key_id)) > 0
        values = {k: (json.dumps(list(v)) if k == "routes" and v is not None else v) for k, v in limits.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.conn:
            cur = self.conn.execute(f"UPDATE api_keys SET {sets} WHERE id = ? OR name = ?", [*values.values(), key_id, key_id])
        return cur.rowcount > 0

    def key_spend_since(self, key_id: str, since: float) -> float:
        return float(self.scalar("SELECT coalesce(sum(cost_usd), 0) FROM exchanges WHERE key_id = ? AND ts >= ?", (key_id, since)))

    def revoke_key(self, key_id: str) -> bool:
        with self.conn:
            cur = self.conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE (id = ? OR name = ?) AND revoked IS NULL",
                (time.time(), key_id, key_id),
            )
        return cur.rowcount > 0


_MAX_SQL_VARIABLES = 30_000  # SQLite's limit is 32,766 bound parameters per statement (since 3.32)


class LedgerWriter:
    """Writes exchanges off the event loop, in batches.

    ``submit`` only puts a row on a queue. A thread drains it every ``flush_ms`` (or as soon as
    ``batch_size`` rows wait) and commits them in one transaction, so after a crash at most the last
    window is lost. ``close`` drains everything: on a clean shutdown every submitted row is written.

    When the database cannot be written (disk full, locked, I/O error) the batch is retried with
    backoff and new rows wait in the queue; the queue holds at most ``max_queue`` items and
    ``max_queue_bytes`` bytes of row data (rows of up to a few MiB each would exhaust memory long
    before the item bound), past which rows are dropped and counted (``dropped``), and ``saturated``
    tells ``/readyz`` and the metrics.
    A row the database refuses outright (a constraint) is dropped alone, counted, and never blocks
    the rows behind it.
    """

    def __init__(
        self, path: str | Path, *, flush_ms: float = 50.0, batch_size: int = 512, max_queue: int = 100_000,
        max_queue_bytes: int = 512 * 1024 * 1024,
    ):
        self.path = str(path)
        self.flush_s = flush_ms / 1000.0
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.queued_bytes = 0  # row data submitted and not yet written (or dropped)
        self._bytes_lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.written = 0
        self.dropped = 0
        self.rejected = 0
        self.failed_batches = 0
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.last_flush = 0.0
        self._last_drop_log = 0.0

    def start(self) -> None:
        conn = connect(self.path)
        migrate(conn)
        conn.close()
        self._thread = threading.Thread(target=self._run, name="kdgate-ledger-writer", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def saturated(self) -> bool:
        return self.depth >= self.max_queue or self.queued_bytes >= self.max_queue_bytes

    @staticmethod
    def _size(kind: str, payload: Any) -> int:
        """About the memory a queued item holds: its text and blob values plus a per-value overhead."""
        values = payload.values() if kind == "exchange" else (payload[1] if kind == "sql" else ())
        return sum(len(v) if isinstance(v, (str, bytes)) else 0 for v in values) + 64 * len(values)

    def _release(self, items: Iterable[tuple[str, Any]]) -> None:
        size = sum(self._size(k, p) for k, p in items if k != "marker")
        with self._bytes_lock:
            self.queued_bytes -= size

    def _put(self, item: tuple[str, Any]) -> bool:
        size = self._size(*item)
        if self._queue.qsize() >= self.max_queue or self.queued_bytes + size > self.max_queue_bytes:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 5:
                self._last_drop_log = now
                log.error("ledger queue full (%d rows, %d bytes waiting): dropping rows (%d dropped so far)",
                          self.depth, self.queued_bytes, self.dropped)
            return False
        with self._bytes_lock:
            self.queued_bytes += size
        self._queue.put(item)
        return True

    def submit(self, row: dict[str, Any]) -> bool:
        """Queue one exchange row (keys: a subset of EXCHANGE_COLUMNS); False if it had to be dropped."""
        return self._put(("exchange", row))

    def submit_sql(self, sql: str, params: Sequence[Any] = ()) -> bool:
        """Queue a statement to run in the writer's transaction order (after earlier rows)."""
        return self._put(("sql", (sql, tuple(params))))

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued before this call is committed."""
        marker = threading.Event()
        self._queue.put(("marker", marker))
        return marker.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = connect(self.path)
        stop = False
        while not stop:
            batch: list[tuple[str, Any]] = []
            try:
                item = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                continue
            if item is None:
                stop = True
            else:
                batch.append(item)
            deadline = time.monotonic() + self.flush_s
            while not stop and len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if stop:  # drain what is left
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        batch.append(item)
            self._write(conn, batch)
        conn.close()

    @staticmethod
    def _apply(conn: sqlite3.Connection, kind: str, payload: Any) -> None:
        if kind == "exchange":
            cols = list(payload)
            conn.execute(
                f"INSERT OR IGNORE INTO exchanges ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [payload[c] for c in cols],
            )
        else:
            conn.execute(*payload)

    def _commit(self, conn: sqlite3.Connection, work: list[tuple[str, Any]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            i = 0
            while i < len(work):
                kind, payload = work[i]
                if kind != "exchange":
                    self._apply(conn, kind, payload)
                    i += 1
                    continue
                # Consecutive rows with the same columns go in multi-row INSERTs. Each sqlite3 call
                # releases the GIL and must win it back from a busy event loop (up to the 5 ms switch
                # interval): one call per row (executemany) lets the writer fall seconds behind under
                # load, so a crash would lose the backlog, not just one flush window.
                cols = tuple(payload)
                j = i
                while j < len(work) and work[j][0] == "exchange" and tuple(work[j][1]) == cols:
                    j += 1
                per = max(1, _MAX_SQL_VARIABLES // len(cols))
                one = "(" + ", ".join("?" * len(cols)) + ")"
                for k in range(i, j, per):
                    chunk = work[k : min(j, k + per)]
                    conn.execute(
                        f"INSERT OR IGNORE INTO exchanges ({', '.join(cols)}) VALUES " + ", ".join([one] * len(chunk)),
                        [row[c] for _, row in chunk for c in cols],
                    )
                i = j
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[str, Any]]) -> None:
        markers = [payload for kind, payload in batch if kind == "marker"]
        work = [(kind, payload) for kind, payload in batch if kind != "marker"]
        try:
            self._write_work(conn, work)
        finally:
            self._release(work)
            for marker in markers:
                marker.set()

    def _write_work(self, conn: sqlite3.Connection, work: list[tuple[str, Any]]) -> None:
        attempt = 0
        while work:
            try:
                self._commit(conn, work)
                self.written += sum(1 for k, _ in work if k == "exchange")
                self.last_flush = time.time()
                self.failing_since = None
                break
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
                # one bad row must not block the others: write them one by one, drop the bad ones
                kept = []
                for item in work:
                    try:
                        self._commit(conn, [item])
                        kept.append(item)
                    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:
                        self.rejected += 1
                        log.error("ledger refused a %s row (%s); dropped", item[0], exc)
                self.written += sum(1 for k, _ in kept if k == "exchange")
                break
            except sqlite3.Error as exc:  # locked, disk full, I/O: wait and retry, rows stay queued
                attempt += 1
                self.failed_batches += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.failing_since is None:
                    self.failing_since = time.time()
                log.warning("ledger write failed (attempt %d, %d rows waiting): %s", attempt, len(work) + self.depth, exc)
                if attempt >= 20 and self._closed:
                    log.error("ledger write abandoned at shutdown: %d rows lost", len(work))
                    self.dropped += len(work)
                    break
                time.sleep(min(5.0, 0.05 * 2**attempt))
