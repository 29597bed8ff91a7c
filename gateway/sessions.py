"""Dashboard sessions and login throttling: the admin key exchanged for a session, and a brake on guessing it.

:class:`SessionStore` keeps random session ids in the store (every replica sees them), each with an
expiry and a CSRF token;
``token_for(request)`` gives ``admin_principal`` the admin key of a valid session, and for a
state-changing method only when the request also carries the session's CSRF token in
``x-kdgate-csrf`` (the page reads it from a ``<meta>`` tag, which another site can neither read nor
forge). :class:`LoginThrottle` refuses further logins from an address after repeated failures.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from gateway.admin import CSRF_HEADER

log = logging.getLogger(__name__)

__all__ = ["Session", "SessionStore", "LoginThrottle", "SESSION_COOKIE"]

SESSION_COOKIE = "kdgate_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

@dataclass
class Session:
    sid: str
    csrf: str
    expires: float


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SessionStore:
    """Dashboard sessions, kept in the store so that a browser's session works on every replica.

    A row holds the SHA-256 of the session id (the cookie), the CSRF token, the expiry, and the
    SHA-256 of the admin key that opened it: the key itself is never stored, and a session opened
    with a key that is no longer the admin key is worth nothing. An id not issued, expired or logged
    out gets nothing. Until :meth:`bind` gives it the ledger (at startup), nothing is valid.
    """

    def __init__(self, *, ttl_s: float = 8 * 3600, max_sessions: int = 1000):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._ledger: Any = None
        self._admin_key: str = ""

    def bind(self, ledger: Any, admin_key: str | None) -> None:
        """Use ``ledger`` for the sessions, opened with ``admin_key`` (empty without auth)."""
        self._ledger = ledger
        self._admin_key = admin_key or ""

    def create(self, token: str) -> Session:
        """A new session for a caller who proved the admin key (``token``; any key without auth)."""
        now = time.time()
        session = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), expires=now + self.ttl_s)
        self._ledger.add_session(_digest(session.sid), csrf=session.csrf, expires=session.expires,
                                 admin_hash=_digest(self._admin_key), keep=self.max_sessions, now=now)
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id, or None."""
        if not sid or self._ledger is None:
            return None
        row = self._ledger.session(_digest(sid))
        if row is None or row["expires"] <= time.time():
            return None
        if not hmac.compare_digest(row["admin_hash"], _digest(self._admin_key)):
            return None  # opened with another admin key
        return Session(sid=sid, csrf=row["csrf"], expires=float(row["expires"]))

    def drop(self, sid: str | None) -> None:
        if sid and self._ledger is not None:
            self._ledger.drop_session(_digest(sid))

    def session_of(self, request: Request) -> Session | None:
        return self.get(request.cookies.get(SESSION_COOKIE))

    def token_for(self, request: Request) -> str | None:
        """The admin key behind the request's session cookie, or None.

        For a state-changing method the CSRF header must match the session's token too; without it
        the cookie counts for nothing (so the caller sees 401, as with no credentials at all).
        """
        session = self.session_of(request)
        if session is None:
            return None
        if request.method.upper() not in _SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                log.info("refused a %s %s with a session cookie but no valid CSRF token", request.method, request.url.path)
                return None
        return self._admin_key


class LoginThrottle:
    """Failed dashboard logins per client address: past ``per_minute`` in the last minute, further
    attempts are refused (429) until the oldest failure is a minute old, right key or not."""

    def __init__(self, per_minute: int = 10, *, max_clients: int = 10_000):
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if now - t < 60.0]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.per_minute:
                return None
            return max(1, int(60.0 - (now - times[0])) + 1)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self.max_clients and client not in self._failures:
                self._failures.pop(next(iter(self._failures)))
            self._recent(client, now)
            self._failures.setdefault(client, []).append(now)
