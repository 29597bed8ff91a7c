"""SQLite, the embedded backend: one file holds the whole ledger (WAL mode: readers never block the
writer). The file is created readable by its owner only; SQLite gives its ``-wal`` and ``-shm`` files
the same permissions."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from store.db import SqliteConnection

__all__ = ["connect"]


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
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None, factory=SqliteConnection)
    conn.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn
