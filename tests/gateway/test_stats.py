"""The dashboard's aggregates: rollups agree with brute-force SQL over the ledger, incrementally."""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from store import Ledger
from gateway.stats import Stats, latency_bucket, parse_since, percentile_from_buckets
from tests.sql import sql_rows, sql_value

NOW = datetime(2026, 3, 15, 12, 30, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def write(ledger: Ledger, n: int, *, start: float, end: float, seed: int = 1, routes=("a", "b", "c")) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ts = start + (end - start) * i / max(n - 1, 1)
        served = rng.choice(["student", "teacher", "teacher"])
        asked = served == "student" or rng.random() < 0.4
        status = 200 if rng.random() > 0.05 else 502
        cf = rng.uniform(0.0001, 0.01)
        rows.append({
            "uid": uuid.uuid4().hex, "ts": ts, "route": rng.choice(routes), "served_by": served, "status": status,
            "latency_ms": rng.lognormvariate(1.5, 0.3) if served == "student" else rng.lognormvariate(6, 0.3),
            "cost_usd": 0.0 if served == "student" else cf, "counterfactual_usd": cf,
            "confidence": rng.random() if asked else None, "student_version": 1 if asked else None,
            "prompt_tokens": rng.randint(1, 100), "completion_tokens": rng.randint(1, 10),
        })
    with ledger.conn:
        for r in rows:
            cols = list(r)
            ledger.conn.execute(f"INSERT INTO exchanges ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                [r[c] for c in cols])
            if r["served_by"] == "student" and rng.random() < 0.3:
                ledger.conn.execute(
                    "INSERT INTO shadow_checks (ts, route, exchange_uid, student_version, agree, cost_usd) VALUES (?, ?, ?, 1, ?, ?)",
                    (r["ts"], r["route"], r["uid"], int(rng.random() < 0.9), r["counterfactual_usd"]),
                )
    return rows


def brute(ledger: Ledger, since: float | None = None) -> dict:
    cond = "" if since is None else f" WHERE ts >= {int(since // 3600 * 3600)}"
    e = sql_rows(ledger, 
        "SELECT count(*) AS n, sum(status = 200 AND served_by = 'student') AS student,"
        " sum(served_by = 'teacher' AND confidence IS NOT NULL) AS escalated, total(cost_usd) AS cost,"
        f" total(counterfactual_usd) AS cf FROM exchanges{cond}"
    )[0]
    s = sql_rows(ledger, f"SELECT count(*) AS n, total(agree) AS agree, total(cost_usd) AS cost FROM shadow_checks{cond}")[0]
    return {"requests": e["n"], "student": e["student"] or 0, "escalated": e["escalated"] or 0,
            "teacher_only_usd": e["cf"], "actual_usd": e["cost"] + s["cost"], "saved_usd": e["cf"] - e["cost"] - s["cost"],
            "shadow_checks": s["n"], "agree": s["agree"]}


def assert_totals(got: dict, want: dict) -> None:
    for key in ("requests", "student", "escalated", "shadow_checks"):
        assert got[key] == want[key], key
    for key in ("teacher_only_usd", "actual_usd", "saved_usd"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_overview_matches_brute_force_and_catches_up_incrementally(ledger):
    write(ledger, 600, start=NOW - 40 * 86400, end=NOW - 3600)
    stats = Stats(ledger)
    ov = stats.overview(bucket="day", since=None, now=NOW)
    assert_totals(ov["totals"], brute(ledger))
    assert sum(p["requests"] for p in ov["series"]) == 600
    # new rows are folded in on the next read, and only they are read
    write(ledger, 150, start=NOW - 1800, end=NOW, seed=2)
    assert stats.refresh() == 150 + sql_value(ledger, "SELECT count(*) FROM shadow_checks WHERE ts >= ?", (NOW - 1800,))
    ov = stats.overview(bucket="hour", since=NOW - 86400, now=NOW)
    assert_totals(ov["totals"], brute(ledger))
    assert_totals(ov["range"], brute(ledger, NOW - 86400))
    assert stats.refresh() == 0
    # a rebuild from scratch gives the same answer
    stats.rebuild()
    assert_totals(stats.overview(bucket="day", now=NOW)["totals"], brute(ledger))


def test_today_and_month_savings(ledger):
    write(ledger, 300, start=NOW - 60 * 86400, end=NOW, seed=3)
    ov = Stats(ledger).overview(bucket="day", since=None, now=NOW)
    today = datetime(2026, 3, 15, tzinfo=timezone.utc).timestamp()
    month = datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp()
    assert ov["saved"]["today"] == pytest.approx(brute(ledger, today)["saved_usd"])
    assert ov["saved"]["month"] == pytest.approx(brute(ledger, month)["saved_usd"])
    assert ov["saved"]["today"] < ov["saved"]["month"] < ov["saved"]["total"]


def test_series_buckets(ledger):
    write(ledger, 48, start=NOW - 47 * 3600, end=NOW, seed=4)
    stats = Stats(ledger)
    hourly = stats.overview(bucket="hour", since=None, now=NOW)["series"]
    daily = stats.overview(bucket="day", since=None, now=NOW)["series"]
    assert len(hourly) == 48 and all(p["requests"] == 1 for p in hourly)
    assert [p["t"] % 86400 for p in daily] == [0] * len(daily) and sum(p["requests"] for p in daily) == 48
    with pytest.raises(ValueError):
        stats.overview(bucket="week")


def test_routes_table_matches_brute_force(ledger):
    write(ledger, 900, start=NOW - 5 * 86400, end=NOW, seed=5)
    rows = {r["route"]: r for r in Stats(ledger).routes_table(settings={"a": {"mode": "cascade"}, "z": {"mode": "off"}})}
    assert set(rows) == {"a", "b", "c", "z"} and rows["z"]["requests"] == 0 and rows["a"]["mode"] == "cascade"
    for name in ("a", "b", "c"):
        r = sql_rows(ledger, 
            "SELECT count(*) AS n, sum(status = 200 AND served_by = 'student') AS st,"
            " sum(served_by = 'teacher' AND confidence IS NOT NULL) AS esc FROM exchanges WHERE route = ?", (name,))[0]
        row = rows[name]
        assert row["requests"] == r["n"]
        assert row["student_share"] == pytest.approx(r["st"] / r["n"])
        assert row["escalation_rate"] == pytest.approx(r["esc"] / (r["st"] + r["esc"]))
        for served in ("student", "teacher"):
            lat = sorted(x["latency_ms"] for x in sql_rows(ledger, 
                "SELECT latency_ms FROM exchanges WHERE route = ? AND served_by = ? AND status = 200", (name, served)))
            exact_p50, exact_p95 = lat[len(lat) // 2], lat[int(0.95 * (len(lat) - 1))]
            assert row[f"{served}_p50_ms"] == pytest.approx(exact_p50, rel=0.12)
            assert row[f"{served}_p95_ms"] == pytest.approx(exact_p95, rel=0.12)
        assert row["live_version"] is None and row["live_agreement"] is None  # no live student registered


def test_percentiles_from_buckets_are_within_a_bucket():
    rng = random.Random(0)
    values = [rng.lognormvariate(3, 1) for _ in range(5000)]
    counts: dict[int, int] = {}
    for v in values:
        counts[latency_bucket(v)] = counts.get(latency_bucket(v), 0) + 1
    values.sort()
    for q in (0.5, 0.95, 0.99):
        assert percentile_from_buckets(counts, q) == pytest.approx(values[int(q * len(values))], rel=0.1)
    assert percentile_from_buckets({}, 0.5) is None
    assert latency_bucket(None) == 0 and latency_bucket(0.0) == 0 and latency_bucket(1e12) == 250


@pytest.mark.parametrize(
    "text,expected",
    [("24h", NOW - 86400), ("7d", NOW - 7 * 86400), ("30m", NOW - 1800), ("2w", NOW - 14 * 86400), ("all", None),
     ("1700000000", 1_700_000_000.0), ("2026-03-01", datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp()), (None, 5.0)],
)
def test_parse_since(text, expected):
    assert parse_since(text, now=NOW, default=5.0) == expected


def test_parse_since_refuses_nonsense():
    with pytest.raises(ValueError, match="24h"):
        parse_since("last tuesday")


def test_kdgate_stats_json_and_table(ledger, capsys, monkeypatch):
    from cli.app import main

    write(ledger, 200, start=time.time() - 3 * 86400, end=time.time(), seed=6)
    assert main(["stats", "--db", ledger.path, "--json", "--since", "all", "--bucket", "day"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_totals(out["overview"]["totals"], brute(ledger))
    assert {r["route"] for r in out["routes"]} >= {"a", "b", "c"}
    assert main(["stats", "--db", ledger.path]) == 0
    text = capsys.readouterr().out
    assert "saved" in text and "teacher-only spend" in text and "route" in text.splitlines()[8]
    assert main(["stats", "--db", ledger.path, "--since", "whenever"]) == 2


def test_bench_dashboard_writes_the_figures(tmp_path, capsys):
    from cli.app import main

    out = tmp_path / "bench.json"
    assert main(["bench", "dashboard", "--rows", "5000", "--out", str(out), "--repeat", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 5000 and {"rows", "overview_ms", "routes_ms"} <= set(result)
    assert 0 < result["overview_ms"] < 300 and 0 < result["routes_ms"] < 300
