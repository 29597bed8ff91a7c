"""SQL for tests: reading a ledger directly, independently of the store's own read methods.

The product keeps SQL inside ``store/``; a test that checks what was written reads the file itself,
so a bug in the store cannot hide behind the same bug in the check.
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["sql_rows", "sql_value", "sql_exec"]


def _path(where: Any) -> str:
    return str(getattr(where, "path", where))


def sql_rows(where: Any, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    """Rows of ``sql`` on the ledger ``where`` (a store Ledger or a database path), as dicts."""
    conn = sqlite3.connect(_path(where), timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def sql_value(where: Any, sql: str, params: Any = ()) -> Any:
    """The first column of the first row of ``sql`` (None without rows)."""
    rows = sql_rows(where, sql, params)
    return next(iter(rows[0].values())) if rows else None


def sql_exec(where: Any, sql: str, params: Any = ()) -> None:
    """Run a statement and commit (tests that damage or prepare a ledger on purpose)."""
    conn = sqlite3.connect(_path(where), timeout=30, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()
