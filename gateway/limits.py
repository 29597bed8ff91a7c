"""Per-key limits: requests per minute, tokens per minute, and a spend budget per day and month.

Checked before the request's route is resolved (nothing is learned from a refused request);
refusals are OpenAI's 429 envelope with ``retry-after``. Counters live in memory (one gateway
process); spend is seeded from the ledger the first time a key is seen, so a restart does not
reset a budget.

A budget holds under concurrency: before the teacher is called, the request's maximum cost (its
prompt estimate at the input price plus ``max_tokens`` times ``n`` at the output price) is reserved
against the budget, and the reservation is released when the exchange's ledger row is recorded
with what it really cost. Concurrent requests therefore never spend more than the budget together.

Token counts before the call are an estimate (:func:`estimate_prompt_tokens`): the UTF-8 bytes of
every text the prompt carries, divided by 4 (OpenAI's rule of thumb for English; it over-counts
code and under-counts some scripts), plus 4 per message. Usage counted after the call is the
provider's own.
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

__all__ = ["Limiter", "SharedLimiter", "RateLimited", "QuotaExceeded", "estimate_prompt_tokens", "requested_output_tokens"]

BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
RESERVATION_TTL_S = 900.0  # a reservation whose exchange never recorded a row (a crash in between)


def _texts(value: Any, out: list[str], depth: int = 0) -> None:
    """Every string inside a message's content, tool calls and arguments (bounded depth)."""
    if isinstance(value, str):
        out.append(value)
    elif depth < 8 and isinstance(value, dict):
        for v in value.values():
            _texts(v, out, depth + 1)
    elif depth < 8 and isinstance(value, list):
        for v in value:
            _texts(v, out, depth + 1)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """The documented pre-call estimate of a request's prompt tokens: UTF-8 bytes / 4 of every text
    in ``messages`` (string and list content, tool calls), ``input``, ``tools`` and ``functions``,
    plus 4 per message."""
    texts: list[str] = []
    messages = body.get("messages")
    n_messages = len(messages) if isinstance(messages, list) else 0
    for name in ("messages", "input", "tools", "functions", "prompt", "system", "instructions"):
        _texts(body.get(name), texts)
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return -(-size // BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * n_messages


def requested_output_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (or ``max_tokens``) times ``n``, when the client set one."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return limit * n


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
    reserved: dict[str, tuple[float, float]] = field(default_factory=dict)  # uid -> (amount, at)

    def reserved_total(self, now: float) -> float:
        stale = [uid for uid, (_, at) in self.reserved.items() if now - at > RESERVATION_TTL_S]
        for uid in stale:
            del self.reserved[uid]
        return sum(amount for amount, _ in self.reserved.values())


class Limiter:
    """Limits counted in this process's memory (one gateway on a SQLite ledger)."""

    blocking = False

    def __init__(self, ledger: Any):
        self.ledger = ledger
        self._state: dict[str, _KeyState] = {}
        self._lock = threading.Lock()
        self._reservations: dict[str, str] = {}  # uid -> key id
        self._carried: dict[str, dict[str, tuple[float, float]]] = {}

    def _key(self, key_id: str, now: float) -> _KeyState:
        st = self._state.get(key_id)
        if st is None:
            st = self._state[key_id] = _KeyState(reserved=self._carried.pop(key_id, {}))
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
            self._check_budgets(principal, st, now, 0.0)
            st.requests.append(now)

    @staticmethod
    def _check_budgets(principal: Any, st: _KeyState, now: float, amount: float) -> None:
        limits = principal.limits or {}
        reserved = st.reserved_total(now)
        for name, spent, start, length in (
            ("budget_day_usd", st.day_spend, st.day, 86400.0),
            ("budget_month_usd", st.month_spend, st.month, None),
        ):
            budget = limits.get(name)
            if budget is None:
                continue
            if spent >= budget or (amount > 0 and spent + reserved + amount > budget):
                if length is None:
                    t = time.gmtime(now)
                    nxt = calendar.timegm((t.tm_year + (t.tm_mon == 12), t.tm_mon % 12 + 1, 1, 0, 0, 0))
                else:
                    nxt = start + length
                period = "daily" if length else "monthly"
                if spent >= budget:
                    message = f"Key {principal.key_id} has used its {period} budget of ${budget:g} (spent ${spent:.4f})."
                else:
                    message = (
                        f"Key {principal.key_id}: this request could cost up to ${amount:.6f}, more than the "
                        f"${max(0.0, budget - spent - reserved):.6f} left of its {period} budget of ${budget:g} "
                        f"(${reserved:.6f} is held by requests in flight). Lower max_tokens, or raise the budget."
                    )
                raise QuotaExceeded(message, headers={"retry-after": str(max(1, int(nxt - now)))})

    def has_budget(self, principal: Any) -> bool:
        limits = principal.limits or {}
        return bool(principal.key_id) and not principal.admin and any(
            limits.get(k) is not None for k in ("budget_day_usd", "budget_month_usd"))

    def reserve(self, principal: Any, uid: str, amount: float) -> None:
        """Hold ``amount`` (the request's maximum cost) against the key's budgets until the exchange
        ``uid`` is recorded; raises QuotaExceeded when it does not fit beside what is spent and held."""
        if not self.has_budget(principal):
            return
        now = time.time()
        with self._lock:
            st = self._key(principal.key_id, now)
            self._check_budgets(principal, st, now, amount)
            st.reserved[uid] = (amount, now)
            self._reservations[uid] = principal.key_id

    def record(self, key_id: str | None, *, tokens: int, cost: float, uid: str | None = None) -> None:
        """Count what an answered exchange used (called for every ledger row with a key) and release
        the exchange's reservation."""
        if not key_id or key_id not in self._state:
            return
        now = time.time()
        with self._lock:
            st = self._key(key_id, now)
            if uid is not None and self._reservations.pop(uid, None) is not None:
                st.reserved.pop(uid, None)
            if tokens:
                st.tokens.append((now, tokens))
            st.day_spend += cost
            st.month_spend += cost

    def forget(self, key_id: str) -> None:
        """Limits changed: re-read them (and the spend) on the next request."""
        with self._lock:
            st = self._state.pop(key_id, None)
            if st is not None and st.reserved:
                self._carried[key_id] = st.reserved  # requests in flight still hold their share


class SharedLimiter:
    """The same limits as :class:`Limiter`, counted in the store so that every gateway replica on
    one PostgreSQL ledger enforces them together (:mod:`store.counters`). Each check is a short
    transaction under a per-key lock; they run off the event loop."""

    blocking = True

    def __init__(self, ledger: Any):
        from store.counters import SharedCounters

        self.counters = SharedCounters(ledger)
        self._tpm_keys: set[str] = set()

    def check(self, principal: Any, *, est_tokens: int = 0) -> None:
        limits = principal.limits
        if not limits or not principal.key_id or principal.admin:
            return
        if limits.get("budget_day_usd") is not None or limits.get("budget_month_usd") is not None:
            self._budget(principal, 0.0, uid=None)
        rpm, tpm = limits.get("rpm"), limits.get("tpm")
        if not rpm and not tpm:
            return
        if tpm:
            self._tpm_keys.add(principal.key_id)
        refusal, wait, used = self.counters.take_request(principal.key_id, rpm=rpm, tpm=tpm, est_tokens=est_tokens)
        if refusal == "rpm":
            raise RateLimited(f"Rate limit reached for key {principal.key_id}: {rpm} requests per minute. Retry in {wait}s.",
                              headers={"retry-after": str(wait)})
        if refusal == "tpm":
            raise RateLimited(
                f"Rate limit reached for key {principal.key_id}: {tpm} tokens per minute (used {used}). Retry in {wait}s.",
                headers={"retry-after": str(wait)})

    def has_budget(self, principal: Any) -> bool:
        limits = principal.limits or {}
        return bool(principal.key_id) and not principal.admin and any(
            limits.get(k) is not None for k in ("budget_day_usd", "budget_month_usd"))

    def _budget(self, principal: Any, amount: float, *, uid: str | None) -> None:
        limits = principal.limits or {}
        day, month = limits.get("budget_day_usd"), limits.get("budget_month_usd")
        if uid is None:  # only: is a budget used up already?
            figures = self.counters.spend(principal.key_id)
            for name, budget, spent in (("daily", day, figures["day"]), ("monthly", month, figures["month"])):
                if budget is not None and spent >= budget:
                    raise QuotaExceeded(
                        f"Key {principal.key_id} has used its {name} budget of ${budget:g} (spent ${spent:.4f}).",
                        headers={"retry-after": "60"})
            return
        refusal, figures, wait = self.counters.hold(principal.key_id, uid, amount, budget_day=day, budget_month=month)
        if refusal is None:
            return
        budget = day if refusal == "daily" else month
        spent = figures["day"] if refusal == "daily" else figures["month"]
        if spent >= (budget or 0):
            message = f"Key {principal.key_id} has used its {refusal} budget of ${budget:g} (spent ${spent:.4f})."
        else:
            message = (f"Key {principal.key_id}: this request could cost up to ${amount:.6f}, more than the "
                       f"${max(0.0, budget - spent - figures['held']):.6f} left of its {refusal} budget of ${budget:g} "
                       f"(${figures['held']:.6f} is held by requests in flight). Lower max_tokens, or raise the budget.")
        raise QuotaExceeded(message, headers={"retry-after": str(wait)})

    def reserve(self, principal: Any, uid: str, amount: float) -> None:
        if self.has_budget(principal):
            self._budget(principal, amount, uid=uid)

    def counts_tokens(self, key_id: str) -> bool:
        """Whether this key has a tokens-per-minute limit (its answers' tokens must be counted)."""
        return key_id in self._tpm_keys

    def record(self, key_id: str | None, *, tokens: int, cost: float, uid: str | None = None) -> None:
        """Spend and the hold's release are the ledger writer's (in the exchange's own transaction);
        tokens count towards tokens per minute here."""
        if key_id and tokens and key_id in self._tpm_keys:
            self.counters.add_tokens(key_id, tokens)

    def forget(self, key_id: str) -> None:
        """Limits are read from the key on every request: nothing is cached here."""
