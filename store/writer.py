"""The batched writer: exchanges (and the few statements that must follow them in order) written
off the event loop, in multi-row transactions, with a queue bounded in rows and bytes."""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from store.db import PgConnection, is_postgres, sqlite_path
from store.migrate import migrate
from store.sqlite import connect
from store.types import StoreError

log = logging.getLogger(__name__)

__all__ = ["LedgerWriter"]

_BUMP_ROUTES = "INSERT INTO generations (name, value) VALUES ('routes', 1) ON CONFLICT (name) DO UPDATE SET value = generations.value + 1"


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
        self, url: str | Path, *, flush_ms: float = 50.0, batch_size: int = 512, max_queue: int = 100_000,
        max_queue_bytes: int = 512 * 1024 * 1024,
    ):
        self.url = str(url)
        self.postgres = is_postgres(self.url)
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

    def _open(self) -> Any:
        if self.postgres:
            return PgConnection(self.url, min_size=1, max_size=2)
        return connect(sqlite_path(self.url))

    def _errors(self) -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
        """(errors of one bad row, errors of the database being unwritable for now)."""
        if self.postgres:
            import psycopg
            import psycopg_pool

            return ((psycopg.IntegrityError, psycopg.DataError, psycopg.ProgrammingError),
                    (psycopg.Error, psycopg_pool.PoolTimeout, StoreError))
        return (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError), (sqlite3.Error,)

    def start(self) -> None:
        conn = self._open()
        try:
            migrate(conn)
        finally:
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
        """About the memory a queued item holds: its large text values (what can be megabytes) plus a
        fixed overhead. Runs on the event loop for every row, so it reads only the columns that can be big."""
        if kind == "exchange":
            get = payload.get
            return 2048 + sum(len(v) for v in (get("request"), get("response"), get("answer"), get("teacher_logprobs"),
                                               get("student_answer"), get("error")) if v)
        if kind == "sql":
            return 512 + sum(len(v) for v in payload[1] if isinstance(v, (str, bytes)))
        return 0

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

    def _submit_sql(self, sql: str, params: Sequence[Any] = ()) -> bool:
        """Queue a statement to run in the writer's transaction order (after earlier rows)."""
        return self._put(("sql", (sql, tuple(params))))

    def submit_check(self, check: dict[str, Any]) -> bool:
        """Queue a shadow check: ts, route, exchange_uid, student_version, student_answer,
        teacher_answer, agree, cost_usd (the teacher call's, recorded here and nowhere else),
        confidence and sample_prob (the probability it was checked with; None: not sampled)."""
        cols = ("ts", "route", "exchange_uid", "student_version", "student_answer", "teacher_answer", "agree", "cost_usd",
                "confidence", "sample_prob")
        return self._submit_sql(
            f"INSERT INTO shadow_checks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            tuple(check.get(c) for c in cols),
        )

    def put_response(self, row: dict[str, Any], *, purge_before: float | None = None) -> bool:
        """Queue a stored Responses object (id, key_id, route, ts, expires, items, response; the
        same id again replaces it), after purging those expired before ``purge_before`` if given."""
        cols = ("id", "key_id", "route", "ts", "expires", "items", "response")
        if purge_before is not None and not self._submit_sql("DELETE FROM responses WHERE expires < ?", (purge_before,)):
            return False
        return self._submit_sql(
            f"INSERT INTO responses ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in cols[1:]),
            tuple(row[c] for c in cols),
        )

    def move_exchange(self, uid: str, route: str) -> bool:
        """Queue moving exchange ``uid`` (already queued or written) to ``route``."""
        return self._submit_sql("UPDATE exchanges SET route = ? WHERE uid = ?", (route, uid))

    def set_route_template(self, route: str, template: dict[str, Any]) -> bool:
        """Queue the learned template of an automatic route."""
        return (self._submit_sql("UPDATE routes SET template = ? WHERE name = ?", (json.dumps(template), route))
                and self._submit_sql(_BUMP_ROUTES))

    def add_route(self, name: str, *, teacher_model: str, template: dict[str, Any] | None, origin: str) -> bool:
        """Queue a new route (ignored if one of that name exists), with empty settings."""
        now = time.time()
        return self._submit_sql(
            "INSERT INTO routes (name, teacher_model, settings, template, origin, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (name, teacher_model, "{}", json.dumps(template) if template else None, origin, now, now),
        ) and self._submit_sql(_BUMP_ROUTES)

    def mark(self) -> threading.Event:
        """An event set once everything queued before this call is committed (or dropped as a bad row)."""
        marker = threading.Event()
        self._queue.put(("marker", marker))
        return marker

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued before this call is committed."""
        return self.mark().wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = None
        while conn is None:  # PostgreSQL may be down for now: rows wait in the queue meanwhile
            try:
                conn = self._open()
            except StoreError as exc:
                self.last_error = str(exc)
                if self.failing_since is None:
                    self.failing_since = time.time()
                log.warning("ledger writer cannot connect yet (%s); retrying", exc)
                time.sleep(1.0)
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
    def _apply(conn: Any, kind: str, payload: Any) -> None:
        if kind == "exchange":
            cols = list(payload)
            conn.execute(
                f"INSERT INTO exchanges ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) ON CONFLICT DO NOTHING",
                [payload[c] for c in cols],
            )
        else:
            conn.execute(*payload)

    def _commit(self, conn: Any, work: list[tuple[str, Any]]) -> None:
        conn.execute(conn.dialect.begin_write)
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
                        f"INSERT INTO exchanges ({', '.join(cols)}) VALUES " + ", ".join([one] * len(chunk))
                        + " ON CONFLICT DO NOTHING",
                        [row[c] for _, row in chunk for c in cols],
                    )
                i = j
            if self.postgres:
                self._settle_limits(conn, [p for k, p in work if k == "exchange"])
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except Exception:  # a lost connection cannot roll back; the server did
                pass
            raise

    @staticmethod
    def _settle_limits(conn: Any, rows: list[dict[str, Any]]) -> None:
        """With shared limits (PostgreSQL): each written exchange's cost joins its key's day and month
        spend, and the budget its request held is released, in the same transaction."""
        from store.counters import period_keys

        spend: dict[tuple[str, str], float] = {}
        held: list[str] = []
        for row in rows:
            key_id = row.get("key_id")
            if not key_id:
                continue
            if row.get("uid"):
                held.append(row["uid"])
            cost = float(row.get("cost_usd") or 0.0)
            if cost > 0:
                for period in period_keys(float(row.get("ts") or time.time())):
                    spend[(key_id, period)] = spend.get((key_id, period), 0.0) + cost
        for (key_id, period), amount in spend.items():
            conn.execute(
                "INSERT INTO key_spend (key_id, period, spend) VALUES (?, ?, ?) ON CONFLICT (key_id, period)"
                " DO UPDATE SET spend = key_spend.spend + excluded.spend", (key_id, period, amount))
        for start in range(0, len(held), 1000):
            chunk = held[start : start + 1000]
            conn.execute(f"DELETE FROM budget_holds WHERE uid IN ({', '.join('?' * len(chunk))})", chunk)

    def _write(self, conn: Any, batch: list[tuple[str, Any]]) -> None:
        markers = [payload for kind, payload in batch if kind == "marker"]
        work = [(kind, payload) for kind, payload in batch if kind != "marker"]
        try:
            self._write_work(conn, work)
        finally:
            self._release(work)
            for marker in markers:
                marker.set()

    def _write_work(self, conn: Any, work: list[tuple[str, Any]]) -> None:
        row_errors, transient = self._errors()
        attempt = 0
        while work:
            try:
                self._commit(conn, work)
                self.written += sum(1 for k, _ in work if k == "exchange")
                self.last_flush = time.time()
                self.failing_since = None
                break
            except row_errors:
                # one bad row must not block the others: write them one by one, drop the bad ones
                kept = []
                for item in work:
                    try:
                        self._commit(conn, [item])
                        kept.append(item)
                    except row_errors as exc:
                        self.rejected += 1
                        log.error("ledger refused a %s row (%s); dropped", item[0], exc)
                self.written += sum(1 for k, _ in kept if k == "exchange")
                break
            except transient as exc:  # locked, disk full, I/O, server gone: wait and retry, rows stay queued
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
