"""Per-key limits: requests per minute, tokens per minute, and a spend budget per day and month.

Checked before the teacher is called; refusals are OpenAI's 429 envelope with ``retry-after``.
Counters live in memory (one gateway process); spend is seeded from the ledger the first time a key
is seen, so a restart does not reset a budget.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError

__all__ = ["Limiter", "RateLimited", "QuotaExceeded"]


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


def _day_start(now: float) -> float:
    t = time.gmtime(now)
    return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))


def _month_start(now: float) -> float:
    t = time.gmtime(now)
    return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))


@dataclass
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    day: float = 0.0
    day_spend: float = 0.0
    month: float = 0.0
    month_spend: float = 0.0
    seeded: bool = False


class Limiter:
    def __init__(self, ledger: Any):
        self.ledger = ledger
        self._state: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def _key(self, key_id: str, now: float) -> _KeyState:
        st = self._state.get(key_id)
        if st is None:
            st = self._state[key_id] = _KeyState()
        day, month = _day_start(now), _month_start(now)
        if not st.seeded:
            st.day, st.month = day, month
            st.day_spend = self.ledger.key_spend_since(key_id, day)
            st.month_spend = self.ledger.key_spend_since(key_id, month)
            st.seeded = True
        if st.day != day:
            st.day, st.day_spend = day, 0.0
        if st.month != month:
            st.month, st.month_spend = month, 0.0
        return st

    def check(self, principal: Any, *, est_tokens: int = 0) -> None:
        """Refuse a request over its key's limits (raises RateLimited / QuotaExceeded), else count it."""
        limits = principal.limits
        if not limits or not principal.key_id or principal.admin:
            return
        now = time.time()
        with self._lock:
            st = self._key(principal.key_id, now)
            cutoff = now - 60.0
            while st.requests and st.requests[0] <= cutoff:
                st.requests.popleft()
            while st.tokens and st.tokens[0][0] <= cutoff:
                st.tokens.popleft()
            rpm = limits.get("rpm")
            if rpm and len(st.requests) >= rpm:
                wait = math.ceil(st.requests[0] + 60.0 - now)
                raise RateLimited(
                    f"Rate limit reached for key {principal.key_id}: {rpm} requests per minute. Retry in {wait}s.",
                    headers={"retry-after": str(max(1, wait))},
                )
            tpm = limits.get("tpm")
            used = sum(n for _, n in st.tokens)
            if tpm and used + est_tokens > tpm:
                wait = math.ceil(st.tokens[0][0] + 60.0 - now) if st.tokens else 60
                raise RateLimited(
                    f"Rate limit reached for key {principal.key_id}: {tpm} tokens per minute (used {used}). Retry in {wait}s.",
                    headers={"retry-after": str(max(1, wait))},
                )
            for name, spent, start, length in (
                ("budget_day_usd", st.day_spend, st.day, 86400.0),
                ("budget_month_usd", st.month_spend, st.month, None),
            ):
                budget = limits.get(name)
                if budget is not None and spent >= budget:
                    if length is None:
                        t = time.gmtime(now)
                        nxt = calendar.timegm((t.tm_year + (t.tm_mon == 12), t.tm_mon % 12 + 1, 1, 0, 0, 0))
                    else:
                        nxt = start + length
                    period = "daily" if length else "monthly"
                    raise QuotaExceeded(
                        f"Key {principal.key_id} has used its {period} budget of ${budget:g} (spent ${spent:.4f}).",
                        headers={"retry-after": str(max(1, int(nxt - now)))},
                    )
            st.requests.append(now)

    def record(self, key_id: str | None, *, tokens: int, cost: float) -> None:
        """Count what an answered exchange used (called for every ledger row with a key)."""
        if not key_id or key_id not in self._state:
            return
        now = time.time()
        with self._lock:
            st = self._key(key_id, now)
            if tokens:
                st.tokens.append((now, tokens))
            st.day_spend += cost
            st.month_spend += cost

    def forget(self, key_id: str) -> None:
        """Limits changed: re-read them (and the spend) on the next request."""
        with self._lock:
            self._state.pop(key_id, None)
