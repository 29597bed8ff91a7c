"""Locks that span processes: one distiller worker per ledger.

Two workers on one ledger would train the same routes twice and race to promote. The worker holds,
for its whole life, an exclusive lock that a second one cannot take: on SQLite a ``flock`` on a file
beside the database (``<db>.distiller.lock``); on PostgreSQL a session advisory lock on a connection
kept open for the purpose (released by the server if the process dies).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from store.db import describe_target, is_postgres, redact, sqlite_path
from store.types import StoreError

log = logging.getLogger(__name__)

__all__ = ["WorkerLock"]

_WORKER_LOCK = 0x6B647773  # "kdws"


class WorkerLock:
    """The distiller worker's lock on one ledger. :meth:`acquire` or :class:`StoreError`."""

    def __init__(self, handle: Any, kind: str):
        self._handle = handle
        self.kind = kind

    @classmethod
    def acquire(cls, url: str | Path) -> "WorkerLock":
        url = str(url)
        if is_postgres(url):
            import psycopg

            try:
                conn = psycopg.connect(url, autocommit=True)
            except psycopg.Error as exc:
                raise StoreError(f"Cannot reach PostgreSQL at {describe_target(url)}: {type(exc).__name__}.") from None
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_WORKER_LOCK,)).fetchone()[0]
            if not got:
                conn.close()
                raise StoreError(
                    f"Another distiller worker already runs against {redact(url)}: one worker per ledger (stop it, "
                    "or set embedded_distiller = false on every gateway but one).")
            return cls(conn, "advisory")
        import fcntl

        path = Path(sqlite_path(url) + ".distiller.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"Another distiller worker already runs against {url}: one worker per ledger (stop it, or set "
                "embedded_distiller = false on the other gateway).") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return cls(fd, "flock")

    def release(self) -> None:
        if self._handle is None:
            return
        if self.kind == "advisory":
            try:
                self._handle.close()  # the server releases a session lock with its session
            except Exception:
                pass
        else:
            os.close(self._handle)  # closing the descriptor releases the flock
        self._handle = None
