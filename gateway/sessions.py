"""Dashboard sessions and login throttling: the admin key exchanged for a session, and a brake on guessing it.

:class:`SessionStore` holds random session ids server-side, each with an expiry and a CSRF token;
``token_for(request)`` gives ``admin_principal`` the admin key of a valid session, and for a
state-changing method only when the request also carries the session's CSRF token in
``x-kdgate-csrf`` (the page reads it from a ``<meta>`` tag, which another site can neither read nor
forge). :class:`LoginThrottle` refuses further logins from an address after repeated failures.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

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
    token: str
    expires: float


class SessionStore:
    """Dashboard sessions: random ids held in this process's memory, each with an expiry.

    A restart logs everyone out (by design: nothing about a session is written anywhere). An id
    not issued here, or expired, or logged out, gets nothing.
    """

    def __init__(self, *, ttl_s: float = 8 * 3600, max_sessions: int = 1000):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, token: str) -> Session:
        """A new session for a caller who proved the admin key ``token``."""
        now = time.time()
        session = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), token=token, expires=now + self.ttl_s)
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            while len(self._sessions) >= self.max_sessions:  # drop the oldest
                self._sessions.pop(min(self._sessions, key=lambda k: self._sessions[k].expires))
            self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id, or None."""
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if session.expires <= time.time():
                del self._sessions[sid]
                return None
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

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
        return session.token


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
