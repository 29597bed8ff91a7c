"""Gateway keys (stored hashed) and the admin key.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash: there is nothing to brute-force.
Only the hash and a short public id are stored; the key itself is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from gateway.errors import AuthenticationFailed, PermissionDenied
from store import Ledger

__all__ = ["KeyStore", "Principal", "create_key", "hash_key", "bearer_token"]

KEY_PREFIX = "kdg-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(ledger: Ledger, name: str) -> tuple[str, str]:
    """Create a gateway key; returns (key id, the key). The key is not stored and cannot be shown again."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(6)
    ledger.add_key(key_id, name, hash_key(key))
    return key_id, key


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    admin: bool = False
    limits: dict | None = None  # rpm, tpm, budget_day_usd, budget_month_usd (None: unlimited)
    routes: tuple[str, ...] | None = None  # route names or globs this key may use (None: every route)


ANONYMOUS = Principal(key_id="", name="anonymous")
_NO_KEY = (
    "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>' "
    "(the OpenAI SDK's api_key); create one with `kdgate keys create`."
)


class KeyStore:
    """Checks keys against the ledger, with a short-lived cache so the hot path does no I/O.

    Revocations made through this process take effect at once; those made by another process
    (the CLI) within ``ttl_s``.
    """

    def __init__(self, ledger: Ledger, *, admin_key: str | None, enabled: bool = True, ttl_s: float = 5.0):
        self.ledger = ledger
        self.enabled = enabled
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def gateway_principal(self, authorization: str | None) -> Principal:
        """The caller of a model endpoint; raises AuthenticationFailed (401)."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationFailed(_NO_KEY)
        digest = hash_key(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(key_id="admin", name="admin", admin=True)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is None or now - hit[0] > self.ttl_s:
            row = self.ledger.key_by_hash(digest)
            if row is None or row["revoked"]:
                principal = None
            else:
                limits = {k: row[k] for k in ("rpm", "tpm", "budget_day_usd", "budget_month_usd") if row.get(k) is not None}
                scope = tuple(row["routes"]) if row.get("routes") is not None else None
                principal = Principal(key_id=row["id"], name=row["name"], limits=limits or None, routes=scope)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now, principal)
        else:
            principal = hit[1]
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided. Create a key with `kdgate keys create`.")
        return principal

    def admin_principal(self, token: str | None) -> Principal:
        """The caller of an admin endpoint: only the admin key passes (403 for a gateway key)."""
        if not self.enabled:
            return Principal(key_id="admin", name="local", admin=True)
        if self._admin_hash is None:
            raise PermissionDenied(
                "The admin API is disabled: no admin key is configured (set KDGATE_ADMIN_KEY or admin_key)."
            )
        if not token:
            raise AuthenticationFailed("The admin API needs the admin key as 'Authorization: Bearer <admin key>'.")
        if hmac.compare_digest(hash_key(token), self._admin_hash):
            return Principal(key_id="admin", name="admin", admin=True)
        if self.ledger.key_by_hash(hash_key(token)) is not None:
            raise PermissionDenied("A gateway key cannot use the admin API; use the admin key.")
        raise AuthenticationFailed("Incorrect admin key.")
