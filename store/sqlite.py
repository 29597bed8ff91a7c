"""SQLite, the embedded backend: connections with the pragmas every one needs, and migrations.

One file holds the whole ledger (WAL mode: readers never block the writer). The file is created
readable by its owner only; SQLite gives its ``-wal`` and ``-shm`` files the same permissions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from store.schema import MIGRATIONS, SQLITE, AddColumn, Index, Migration, Table
from store.types import SchemaTooNew

log = logging.getLogger(__name__)

__all__ = ["connect", "migrate", "applied_migrations"]


def _private_file(path: Path) -> None:
    """Create the ledger file readable by its owner only (it holds every prompt and answer)."""
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


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _apply(conn: sqlite3.Connection, migration: Migration) -> None:
    for step in migration.steps:
        if isinstance(step, (Table, Index)):
            conn.execute(step.ddl(SQLITE))
        elif isinstance(step, AddColumn):
            if step.column not in _columns(conn, step.table):
                conn.execute(f"ALTER TABLE {step.table} ADD COLUMN {step.column} {SQLITE.column_type(step.kind)}")
        else:  # pragma: no cover - the schema module defines every step type
            raise TypeError(f"unknown migration step {step!r}")


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'").fetchone():
        return []
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations this database has not seen yet; returns their names. Refuses a database
    migrated by a newer kdgate (:class:`SchemaTooNew`)."""
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at FLOAT)")
    done = set(applied_migrations(conn))
    known = {m.name for m in MIGRATIONS}
    unknown = sorted(done - known)
    if unknown:
        raise SchemaTooNew(
            f"The ledger was migrated by a newer kdgate ({', '.join(unknown)}); this version knows migrations up to "
            f"{MIGRATIONS[-1].name}. Upgrade kdgate, or point it at another database."
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
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
