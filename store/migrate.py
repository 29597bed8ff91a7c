"""Applying the named migrations (:mod:`store.schema`) to a database of either backend.

Each migration runs in one transaction that first takes the database's write lock (SQLite) or an
advisory lock (PostgreSQL), so replicas starting together apply each migration once. A database
migrated by a newer kdgate (a migration name this code does not know) is refused.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from store.schema import MIGRATIONS, AddColumn, Index, Migration, Table
from store.types import SchemaTooNew

log = logging.getLogger(__name__)

__all__ = ["migrate", "applied_migrations", "pending_migrations"]

_LOCK_ID = 0x6B646761  # "kdga": the advisory lock migrations take on PostgreSQL


def _columns(conn: Any, table: str) -> set[str]:
    if conn.dialect.name == "sqlite":
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    return {row[0] for row in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?",
        (table,))}


def _has_table(conn: Any, table: str) -> bool:
    if conn.dialect.name == "sqlite":
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() is not None
    return conn.execute(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?",
        (table,)).fetchone() is not None


def _apply(conn: Any, migration: Migration) -> None:
    d = conn.dialect
    for step in migration.steps:
        if isinstance(step, (Table, Index)):
            conn.execute(step.ddl(d))
        elif isinstance(step, AddColumn):
            if step.column not in _columns(conn, step.table):
                conn.execute(f"ALTER TABLE {step.table} ADD COLUMN {step.column} {d.column_type(step.kind)}")
        else:  # pragma: no cover - the schema module defines every step type
            raise TypeError(f"unknown migration step {step!r}")


def applied_migrations(conn: Any) -> list[str]:
    if not _has_table(conn, "_migrations"):
        return []
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]


def pending_migrations(conn: Any) -> list[str]:
    done = set(applied_migrations(conn))
    return [m.name for m in MIGRATIONS if m.name not in done]


def _check_not_newer(done: set[str]) -> None:
    unknown = sorted(done - {m.name for m in MIGRATIONS})
    if unknown:
        raise SchemaTooNew(
            f"The ledger was migrated by a newer kdgate ({', '.join(unknown)}); this version knows migrations up to "
            f"{MIGRATIONS[-1].name}. Upgrade kdgate, or point it at another database."
        )


def migrate(conn: Any) -> list[str]:
    """Apply the migrations this database has not seen yet; returns their names. Refuses a database
    migrated by a newer kdgate (:class:`store.types.SchemaTooNew`)."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS _migrations (name {conn.dialect.column_type('pk_text')}, "
                 f"applied_at {conn.dialect.column_type('real')})")
    done = set(applied_migrations(conn))
    _check_not_newer(done)
    applied = []
    for migration in MIGRATIONS:
        if migration.name in done:
            continue
        conn.execute(conn.dialect.begin_write)
        try:
            if conn.dialect.name == "postgresql":
                conn.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_ID,))
            if migration.name in set(applied_migrations(conn)):  # another process got there first
                conn.execute("COMMIT")
                continue
            _apply(conn, migration)
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (migration.name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(migration.name)
        log.info("ledger migration applied: %s", migration.name)
    return applied
