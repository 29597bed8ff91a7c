"""``kdgate stats`` (savings and per-route figures in the terminal) and ``kdgate bench dashboard``.

A thin edge over :mod:`gateway.stats`: the same numbers the dashboard shows, as tables or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["register", "register_bench", "seed_ledger", "cmd_stats", "cmd_bench_dashboard"]


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
    from gateway.ledger import Ledger
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


# -- kdgate bench dashboard -------------------------------------------------------------------
def register_bench(bench_sub: Any) -> None:
    """Add ``kdgate bench dashboard`` to the benchmarks."""
    p = bench_sub.add_parser("dashboard", help="time the dashboard's overview and routes-table queries on a big ledger")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic exchanges to seed (default 1,000,000)")
    p.add_argument("--out", default="bench/results/dashboard.json", help="where to write the JSON result")
    p.add_argument("--db", help="ledger to seed (default: a fresh temporary file)")
    p.add_argument("--routes", type=int, default=12, help="routes to spread the rows over (default 12)")
    p.add_argument("--days", type=int, default=60, help="days of history to spread the rows over (default 60)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per query; the slowest is reported (default 5)")
    p.set_defaults(func=cmd_bench_dashboard)


def seed_ledger(
    path: str | Path, rows: int, *, routes: int = 12, days: int = 60, shadow_rate: float = 0.03, now: float | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """Write ``rows`` synthetic exchanges (with students, curves and shadow checks) into a ledger.

    Students take over each route part-way through the history, as they would after distillation.
    Returns what was written (route names, counts).
    """
    from gateway.ledger import connect, migrate

    rng = random.Random(seed)
    now = time.time() if now is None else now
    start = now - days * 86400
    conn = connect(path)
    migrate(conn)
    conn.execute("PRAGMA synchronous=OFF")
    names = [f"route-{i:02d}" for i in range(routes)]
    weights = [1.0 / (i + 1) for i in range(routes)]
    takeover = {n: start + rng.uniform(0.1, 0.6) * days * 86400 for n in names}
    curve = [{"threshold": round(1 - i / 50, 4), "coverage": round(min(1.0, (i / 50) ** 0.7), 4),
              "agreement": round(1.0 - 0.15 * (i / 50) ** 2, 4)} for i in range(51)]
    conn.execute("BEGIN")
    for n in names:
        conn.execute(
            "INSERT OR IGNORE INTO routes (name, teacher_model, settings, template, origin, created, updated)"
            " VALUES (?, 'openai/gpt-4o-mini', ?, NULL, 'admin', ?, ?)",
            (n, json.dumps({"mode": "cascade", "target_agreement": 0.97}), start, start),
        )
        for version, status in ((1, "retired"), (2, "live")):
            conn.execute(
                "INSERT OR IGNORE INTO students (route, version, kind, created, train_pairs, val_pairs, metrics, curve,"
                " calibration, artifact_path, checksum, status) VALUES (?, ?, 'label', ?, 2000, 500, ?, ?, '{}', '', '', ?)",
                (n, version, takeover[n], json.dumps({"agreement": 0.93 + 0.02 * version, "coverage_at_target": 0.8,
                                                       "target_agreement": 0.97, "threshold_at_target": 0.62, "ece": 0.02}),
                 json.dumps(curve), status),
            )
    conn.execute("COMMIT")
    request = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Classify: my card was declined"}]})
    batch: list[tuple[Any, ...]] = []
    shadows: list[tuple[Any, ...]] = []
    cols = ("uid, ts, route, key_id, endpoint, model, teacher_model, request, answer, finish_reason, prompt_tokens,"
            " completion_tokens, cost_usd, counterfactual_usd, latency_ms, status, served_by, student_version, confidence, stream")
    insert = f"INSERT INTO exchanges ({cols}) VALUES ({', '.join('?' * 20)})"
    step = (now - start) / max(rows, 1)
    for i in range(rows):
        ts = start + i * step
        route = rng.choices(names, weights)[0]
        pt, ct = rng.randint(40, 400), rng.randint(1, 30)
        teacher_cost = pt * 0.15e-6 + ct * 0.6e-6
        status = 200 if rng.random() > 0.005 else 502
        served, version, conf = "teacher", None, None
        if ts > takeover[route] and status == 200:
            conf = rng.random()
            version = 2
            if conf >= 0.3:
                served = "student"
        if served == "student":
            cost, latency = 0.0, rng.lognormvariate(2.0, 0.5)
        else:
            cost, latency = (teacher_cost if status == 200 else 0.0), rng.lognormvariate(6.3, 0.4)
        uid = f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}"
        batch.append((uid, ts, route, "", "chat.completions", "gpt-4o-mini", "openai/gpt-4o-mini", request,
                      "card_declined", "stop", pt, ct, cost, teacher_cost if status == 200 else 0.0, latency, status,
                      served, version, conf, 0))
        if served == "student" and rng.random() < shadow_rate:
            agree = int(rng.random() < 0.96)
            shadows.append((ts, route, uid, version, "card_declined", "card_declined" if agree else "declined_transfer",
                            agree, teacher_cost))
        if len(batch) >= 20_000:
            _flush_seed(conn, insert, batch, shadows)
    _flush_seed(conn, insert, batch, shadows)
    conn.execute("PRAGMA synchronous=NORMAL")
    total_shadow = conn.execute("SELECT count(*) FROM shadow_checks").fetchone()[0]
    conn.close()
    return {"routes": names, "rows": rows, "shadow_checks": int(total_shadow)}


def _flush_seed(conn: Any, insert: str, batch: list[tuple[Any, ...]], shadows: list[tuple[Any, ...]]) -> None:
    conn.execute("BEGIN")
    conn.executemany(insert, batch)
    conn.executemany(
        "INSERT INTO shadow_checks (ts, route, exchange_uid, student_version, student_answer, teacher_answer, agree, cost_usd)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        shadows,
    )
    conn.execute("COMMIT")
    batch.clear()
    shadows.clear()


def cmd_bench_dashboard(args: argparse.Namespace) -> int:
    """Seed a ledger, build the rollups, and time the overview and routes-table queries."""
    from gateway.ledger import Ledger
    from gateway.stats import Stats

    tmp = None
    if args.db:
        db = args.db
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kdgate-bench-")
        db = str(Path(tmp.name) / "ledger.db")
    try:
        t0 = time.perf_counter()
        seeded = seed_ledger(db, args.rows, routes=args.routes, days=args.days)
        seed_s = time.perf_counter() - t0
        print(f"seeded {args.rows:,} exchanges in {seed_s:.1f}s", file=sys.stderr, flush=True)
        ledger = Ledger(db)
        stats = Stats(ledger, min_interval_s=0.0)
        t0 = time.perf_counter()
        stats.refresh(force=True)
        rollup_ms = (time.perf_counter() - t0) * 1000
        settings = {n: {"mode": "cascade", "threshold": None, "target_agreement": 0.97} for n in seeded["routes"]}
        overview_runs, routes_runs = [], []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            stats.overview(bucket="hour", since=time.time() - 7 * 86400)
            stats.overview(bucket="day", since=None)
            overview_runs.append((time.perf_counter() - t0) * 1000 / 2)
            t0 = time.perf_counter()
            stats.routes_table(since=None, settings=settings)
            routes_runs.append((time.perf_counter() - t0) * 1000)
        # a refresh after fresh traffic is what a live gateway does every few seconds
        seed_more = 1000
        _append_live(db, seeded["routes"], seed_more)
        t0 = time.perf_counter()
        stats.refresh(force=True)
        incremental_ms = (time.perf_counter() - t0) * 1000
        result = {
            "rows": args.rows,
            "overview_ms": round(max(overview_runs), 2),
            "routes_ms": round(max(routes_runs), 2),
            "overview_ms_median": round(statistics.median(overview_runs), 2),
            "routes_ms_median": round(statistics.median(routes_runs), 2),
            "rollup_build_ms": round(rollup_ms, 1),
            "rollup_incremental_ms_per_1000_rows": round(incremental_ms, 2),
            "seed_s": round(seed_s, 1),
            "shadow_checks": seeded["shadow_checks"],
            "routes": len(seeded["routes"]),
            "note": "query times are the slowest of --repeat runs, after the one-time rollup build",
        }
        ledger.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["overview_ms"] < 300 and result["routes_ms"] < 300
    if not ok:
        print("slower than the 300 ms target", file=sys.stderr)
    return 0


def _append_live(db: str, routes: list[str], n: int) -> None:
    from gateway.ledger import connect

    conn = connect(db)
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO exchanges (uid, ts, route, served_by, status, latency_ms, cost_usd, counterfactual_usd)"
        " VALUES (?, ?, ?, 'student', 200, 5.0, 0.0, 0.0001)",
        [(f"live-{uuid.uuid4().hex}", now, routes[i % len(routes)]) for i in range(n)],
    )
    conn.execute("COMMIT")
    conn.close()
