"""``kdgate stats``: savings and per-route figures in the terminal.

A thin edge over :mod:`gateway.stats`: the same numbers the dashboard shows, as tables or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["register", "cmd_stats"]


# -- kdgate stats -----------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add ``kdgate stats`` to the top-level sub-commands."""
    p = subparsers.add_parser("stats", help="spend, savings and per-route figures (what the dashboard shows)")
    p.add_argument("--db", help="SQLite ledger path (default from settings: kdgate.db)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--bucket", choices=["hour", "day"], default="day", help="series bucket (default day)")
    p.add_argument("--since", default="7d", help="range start: 24h, 7d, 30d, all, a unix time or an ISO date (default 7d)")
    p.set_defaults(func=cmd_stats)


def _ledger_and_routes(args: argparse.Namespace) -> tuple[Any, dict[str, dict[str, Any]]]:
    from store import Ledger
    from gateway.routing import RouteTable
    from gateway.settings import load_settings

    settings = load_settings(getattr(args, "config", None), db=getattr(args, "db", None))
    ledger = Ledger(settings.db)
    table = RouteTable(settings, ledger, writer=None)
    return ledger, {r.name: dict(r.settings) for r in table.all()}


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the overview and the routes table (or both as one JSON object with ``--json``)."""
    from gateway.stats import Stats, parse_since

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"kdgate stats: {exc}", file=sys.stderr)
        return 2
    ledger, settings = _ledger_and_routes(args)
    stats = Stats(ledger)
    overview = stats.overview(bucket=args.bucket, since=since)
    routes = stats.routes_table(since=since, settings=settings)
    if args.json:
        print(json.dumps({"overview": overview, "routes": routes}, indent=2))
        return 0
    t, r = overview["totals"], overview["range"]
    print("kdgate savings (all time)")
    print(f"  requests            {t['requests']:,}")
    print(f"  served by students  {_pct(t['student_share'])}")
    print(f"  teacher-only spend  {_usd(t['teacher_only_usd'])}")
    print(f"  actual spend        {_usd(t['actual_usd'])}")
    print(f"  saved               {_usd(overview['saved']['total'])}  (today {_usd(overview['saved']['today'])},"
          f" this month {_usd(overview['saved']['month'])})")
    print(f"  since {args.since}: {r['requests']:,} requests, {_pct(r['student_share'])} by students, {_usd(r['saved_usd'])} saved")
    print()
    from gateway.cli import _print_table

    rows = [
        {
            "route": x["route"], "requests": x["requests"], "student": _pct(x["student_share"]),
            "escalation": _pct(x["escalation_rate"]), "val_agree": _pct(x["validation_agreement"]),
            "live_agree": _pct(x["live_agreement"]), "student_p50/p95": f"{_ms(x['student_p50_ms'])}/{_ms(x['student_p95_ms'])}",
            "teacher_p50/p95": f"{_ms(x['teacher_p50_ms'])}/{_ms(x['teacher_p95_ms'])}",
            "version": f"v{x['live_version']}" if x["live_version"] is not None else "-", "mode": x["mode"],
            "saved": _usd(x["saved_usd"]),
        }
        for x in routes
    ]
    _print_table(rows, ["route", "requests", "student", "escalation", "val_agree", "live_agree", "student_p50/p95",
                        "teacher_p50/p95", "version", "mode", "saved"])
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _usd(v: float | None) -> str:
    return "-" if v is None else f"${v:,.2f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"
