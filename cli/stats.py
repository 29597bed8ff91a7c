"""``kdgate stats``: spend, savings and per-route figures, the numbers the dashboard shows."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from cli.common import Json, load
from cli.output import fail, ms, pct, print_json, print_table, usd

__all__ = ["stats", "Bucket"]

COLUMNS = ["route", "requests", "student", "escalation", "val_agree", "live_agree", "student_p50/p95", "teacher_p50/p95",
           "version", "mode", "saved"]


class Bucket(str, Enum):
    hour = "hour"
    day = "day"


def stats(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option(help="SQLite ledger path (default from settings: kdgate.db)")] = None,
    json: Json = False,
    bucket: Annotated[Bucket, typer.Option(help="series bucket")] = Bucket.day,
    since: Annotated[str, typer.Option(help="range start: 24h, 7d, 30d, all, a unix time or an ISO date")] = "7d",
) -> None:
    """Spend, savings and per-route figures (what the dashboard shows); --json gives both as one object."""
    from gateway.routing import RouteTable
    from gateway.stats import Stats, parse_since
    from store import Ledger

    try:
        start = parse_since(since)
    except ValueError as exc:
        fail(f"stats: {exc}", 2)
    settings = load(ctx, db=db)
    ledger = Ledger(settings.db)
    route_settings = {r.name: dict(r.settings) for r in RouteTable(settings, ledger, writer=None).all()}
    figures = Stats(ledger)
    overview = figures.overview(bucket=bucket.value, since=start)
    routes = figures.routes_table(since=start, settings=route_settings)
    if json:
        print_json({"overview": overview, "routes": routes})
        return
    t, r, saved = overview["totals"], overview["range"], overview["saved"]
    print("kdgate savings (all time)")
    print(f"  requests            {t['requests']:,}")
    print(f"  served by students  {pct(t['student_share'])}")
    print(f"  teacher-only spend  {usd(t['teacher_only_usd'])}")
    print(f"  actual spend        {usd(t['actual_usd'])}")
    print(f"  saved               {usd(saved['total'])}  (today {usd(saved['today'])}, this month {usd(saved['month'])})")
    print(f"  since {since}: {r['requests']:,} requests, {pct(r['student_share'])} by students, {usd(r['saved_usd'])} saved")
    print()
    print_table([
        {
            "route": x["route"], "requests": x["requests"], "student": pct(x["student_share"]),
            "escalation": pct(x["escalation_rate"]), "val_agree": pct(x["validation_agreement"]),
            "live_agree": pct(x["live_agreement"]), "student_p50/p95": f"{ms(x['student_p50_ms'])}/{ms(x['student_p95_ms'])}",
            "teacher_p50/p95": f"{ms(x['teacher_p50_ms'])}/{ms(x['teacher_p95_ms'])}",
            "version": f"v{x['live_version']}" if x["live_version"] is not None else "-", "mode": x["mode"],
            "saved": usd(x["saved_usd"]),
        }
        for x in routes
    ], COLUMNS)
