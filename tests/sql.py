"""SQL for tests: reading a ledger directly, independently of the store's own read methods.

The product keeps SQL inside ``store/``; a test that checks what was written reads the database
itself (the SQLite file, or the PostgreSQL database with psycopg), so a bug in the store cannot hide
behind the same bug in the check. SQL here uses ``?`` placeholders for both.
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["sql_rows", "sql_value", "sql_exec"]


def _url(where: Any) -> str:
    return str(getattr(where, "url", None) or getattr(where, "path", None) or where)


def _pg(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def sql_rows(where: Any, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    """Rows of ``sql`` on the ledger ``where`` (a store Ledger, a database path or a DSN), as dicts."""
    url = _url(where)
    if _pg(url):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            return list(conn.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params)).fetchall())
    conn = sqlite3.connect(url, timeout=30)
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
    url = _url(where)
    if _pg(url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), tuple(params))
        return
    conn = sqlite3.connect(url, timeout=30, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()
