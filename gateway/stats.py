"""The dashboard's figures, for the admin API and ``kdgate stats``: rollup sums turned into spend,
saving, shares and latencies.

The sums come from the store's rollups (:mod:`store.rollups`, fast at a million exchanges); what
they mean in money is :mod:`gateway.money`'s. Definitions used everywhere (the API docs and the
page say the same):

- *teacher-only spend* is ``sum(counterfactual_usd)``: what the traffic would have cost with the
  teacher answering every request;
- *actual spend* is the exchanges' ``cost_usd`` plus the shadow checks' (teacher calls made only to
  check a student answer), each counted once (:func:`gateway.money.actual_spend`);
- *saved* is the difference (:func:`gateway.money.saved`);
- *student share* is student answers (status 200) over all requests;
- an *escalation* is a request the student was asked first and the teacher answered; the
  *escalation rate* is escalations over requests the student was asked first.

Known limit: an exchange moved to another route after it was rolled up (the automatic router moves
the one request that first showed a new prompt template) stays counted under its first route.
"""

from __future__ import annotations

import logging
import math
import re
import time
from datetime import datetime, timezone
from typing import Any

from gateway.money import actual_spend, saved
from router.text import last_user_text
from store.rollups import Rollups, bucket_upper_ms, latency_bucket, percentile_from_buckets

log = logging.getLogger(__name__)

__all__ = ["Stats", "parse_since", "percentile_from_buckets", "latency_bucket", "bucket_upper_ms"]


_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")


_LATEST_SINCE = 4102444800.0  # 2100-01-01: any later start time is a mistake


def _in_range(ts: float, given: object) -> float:
    if not math.isfinite(ts) or not 0.0 <= ts <= _LATEST_SINCE:
        raise ValueError(f"Cannot read since={str(given)[:80]!r}: a start time must fall between 1970 and 2100.")
    return ts


def parse_since(value: str | float | None, *, now: float | None = None, default: float | None = None) -> float | None:
    """A start time from ``24h``/``7d``/``30m``/``2w``, ``all``, a unix time or an ISO date (UTC).

    Returns None for ``all`` (no lower bound). Raises ValueError with a sentence for anything else.
    """
    now = time.time() if now is None else now
    if value is None or value == "":
        return default
    if isinstance(value, (int, float)):
        return _in_range(float(value), value)
    text = value.strip().lower()
    if text == "all":
        return None
    m = _SINCE_RE.match(text)
    if m:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
        return _in_range(now - float(m.group(1)) * unit, value)
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return _in_range(number, value)
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"Cannot read since={value[:80]!r}: use a span like 24h, 7d or 30m, 'all', a unix time, or an ISO date."
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        return _in_range(dt.timestamp(), value)
    except OverflowError:
        raise ValueError(f"Cannot read since={value[:80]!r}: a start time must fall between 1970 and 2100.") from None


def _day_start(ts: float) -> float:
    return float(int(ts // 86400) * 86400)


def _month_start(ts: float) -> float:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return datetime(dt.year, dt.month, 1, tzinfo=timezone.utc).timestamp()


def _ratio(num: float, den: float) -> float | None:
    return (num / den) if den else None


class Stats:
    """The dashboard's figures over one ledger. Thread-safe; cheap to keep for the app's lifetime."""

    def __init__(self, ledger: Any, *, min_interval_s: float = 0.0):
        self.ledger = ledger
        self.rollups = Rollups(ledger, min_interval_s=min_interval_s)

    def refresh(self, *, force: bool = False) -> int:
        """Fold rows written since the last refresh into the rollups (see :mod:`store.rollups`)."""
        return self.rollups.refresh(force=force)

    def rebuild(self) -> int:
        return self.rollups.rebuild()

    # -- reads ------------------------------------------------------------------------------
    def _totals(self, since: float | None, until: float | None = None) -> dict[str, Any]:
        s = self.rollups.totals(since, until)
        actual = actual_spend(s["cost_usd"], s["check_cost_usd"])
        return {
            "requests": s["requests"],
            "student": s["student"],
            "escalated": s["escalated"],
            "errors": s["errors"],
            "student_share": _ratio(s["student"], s["requests"]),
            "teacher_only_usd": s["counterfactual_usd"],
            "actual_usd": actual,
            "saved_usd": saved(s["counterfactual_usd"], actual),
            "prompt_tokens": s["prompt_tokens"],
            "completion_tokens": s["completion_tokens"],
            "shadow_checks": s["checks"],
            "live_agreement": _ratio(s["agree"], s["checks"]),
        }

    def overview(self, *, bucket: str = "hour", since: float | None = None, now: float | None = None) -> dict[str, Any]:
        """Spend, saving and student share: all time, today, this month, the range, and a series.

        ``bucket`` is ``hour`` or ``day`` (UTC); ``since`` bounds the range and the series (None: all).
        """
        if bucket not in ("hour", "day"):
            raise ValueError(f"bucket must be 'hour' or 'day', not {bucket!r}.")
        self.refresh()
        now = time.time() if now is None else now
        series = []
        for p in self.rollups.series(width=3600 if bucket == "hour" else 86400, since=since):
            actual = actual_spend(p["cost_usd"], p["check_cost_usd"])
            series.append({
                "t": p["t"], "requests": p["requests"], "student": p["student"], "escalated": p["escalated"],
                "teacher_only_usd": p["counterfactual_usd"], "actual_usd": actual,
                "saved_usd": saved(p["counterfactual_usd"], actual), "student_share": _ratio(p["student"], p["requests"]),
            })
        all_time = self._totals(None)
        return {
            "bucket": bucket,
            "since": since,
            "now": now,
            "totals": all_time,
            "range": self._totals(since) if since is not None else all_time,
            "saved": {
                "total": all_time["saved_usd"],
                "today": self._totals(_day_start(now))["saved_usd"],
                "month": self._totals(_month_start(now))["saved_usd"],
            },
            "series": series,
        }

    def routes_table(
        self, *, since: float | None = None, settings: dict[str, dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """One row per route: volume, student share, escalation rate, agreement, latency, savings.

        ``settings`` maps route name to its effective settings (mode, threshold...) from the route
        table; routes only in ``settings`` (no traffic yet) get a row of zeros.
        """
        self.refresh()
        settings = settings or {}
        zero = {"requests": 0, "student": 0, "escalated": 0, "errors": 0, "cost_usd": 0.0, "counterfactual_usd": 0.0}
        rows = {name: dict(zero) for name in settings}
        for name, sums in self.rollups.by_route(since).items():
            rows[name] = sums
        live = {r["route"]: r for r in self.ledger.live_students()}
        check_cost: dict[str, float] = {}
        checks_live: dict[str, tuple[int, int]] = {}
        for c in self.rollups.checks_by_version(since):
            rows.setdefault(c["route"], dict(zero))
            check_cost[c["route"]] = check_cost.get(c["route"], 0.0) + c["check_cost_usd"]
            lv = live.get(c["route"])
            if lv is not None and c["student_version"] == int(lv["version"]):
                checks_live[c["route"]] = (c["checks"], c["agree"])
        latency = self._latency_by_route(since)
        out = []
        for name in sorted(rows):
            row = rows[name]
            lv = live.get(name)
            metrics = lv["metrics"] if lv else {}
            checks, agree = checks_live.get(name, (0, 0))
            asked = row["student"] + row["escalated"]
            actual = actual_spend(row["cost_usd"], check_cost.get(name, 0.0))
            cfg = settings.get(name, {})
            lat = latency.get(name, {})
            out.append({
                "route": name,
                "requests": row["requests"],
                "student_share": _ratio(row["student"], row["requests"]),
                "escalation_rate": _ratio(row["escalated"], asked),
                "validation_agreement": metrics.get("agreement"),
                "live_agreement": _ratio(agree, checks),
                "shadow_checks": checks,
                "student_p50_ms": lat.get("student", {}).get("p50"),
                "student_p95_ms": lat.get("student", {}).get("p95"),
                "teacher_p50_ms": lat.get("teacher", {}).get("p50"),
                "teacher_p95_ms": lat.get("teacher", {}).get("p95"),
                "live_version": int(lv["version"]) if lv else None,
                "student_kind": lv["kind"] if lv else None,
                "mode": cfg.get("mode"),
                "threshold": cfg.get("threshold"),
                "target_agreement": cfg.get("target_agreement"),
                "teacher_only_usd": row["counterfactual_usd"],
                "actual_usd": actual,
                "saved_usd": saved(row["counterfactual_usd"], actual),
                "errors": row["errors"],
            })
        return out

    def _latency_by_route(self, since: float | None) -> dict[str, dict[str, dict[str, float | None]]]:
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for (route, served_by), counts in self.rollups.latency_histograms(since).items():
            out.setdefault(route, {})[served_by] = {
                "p50": percentile_from_buckets(counts, 0.50),
                "p95": percentile_from_buckets(counts, 0.95),
            }
        return out

    # -- per-route detail (small queries on indexed columns; no rollup needed) ----------------
    def versions(self, route: str) -> list[dict[str, Any]]:
        """Every student version of a route, newest first, with validation metrics and live agreement."""
        self.refresh()
        checks = {c["student_version"]: (c["checks"], c["agree"]) for c in self.rollups.checks_by_version(route=route)}
        out = []
        for r in self.ledger.student_versions(route):
            n, agree = checks.get(int(r["version"]), (0, 0))
            out.append({**r, "shadow_checks": n, "live_agreement": _ratio(agree, n)})
        return out

    def live_curve(self, route: str) -> tuple[int | None, list[dict[str, float]]]:
        """The live version of a route and its coverage/agreement curve (highest threshold first)."""
        live = self.ledger.live_student(route)
        if live is None:
            return None, []
        curve = sorted(live["curve"] or [], key=lambda p: -float(p["threshold"]))
        return int(live["version"]), curve

    def recent_exchanges(self, route: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """The route's latest exchanges, newest first, with the shadow check (if any) alongside."""
        out = []
        for r in self.ledger.recent_exchanges(route, limit=limit):
            messages = r.pop("messages")
            out.append({**r, "prompt": last_user_text(messages)})
        return out


