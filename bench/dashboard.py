"""``kdgate bench dashboard``: the dashboard's overview and routes-table queries timed on a big ledger."""

from __future__ import annotations

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

__all__ = ["seed_ledger", "run_dashboard", "TARGET_MS"]

TARGET_MS = 300.0  # what the dashboard's two queries must stay under


def seed_ledger(
    path: str | Path, rows: int, *, routes: int = 12, days: int = 60, shadow_rate: float = 0.03, now: float | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """Write ``rows`` synthetic exchanges (with students, curves and shadow checks) into a ledger.

    Students take over each route part-way through the history, as they would after distillation.
    Returns what was written (route names, counts).
    """
    from store import Ledger

    rng = random.Random(seed)
    now = time.time() if now is None else now
    start = now - days * 86400
    ledger = Ledger(path)
    names = [f"route-{i:02d}" for i in range(routes)]
    weights = [1.0 / (i + 1) for i in range(routes)]
    takeover = {n: start + rng.uniform(0.1, 0.6) * days * 86400 for n in names}
    curve = [{"threshold": round(1 - i / 50, 4), "coverage": round(min(1.0, (i / 50) ** 0.7), 4),
              "agreement": round(1.0 - 0.15 * (i / 50) ** 2, 4)} for i in range(51)]
    ledger.insert_rows("routes", [
        {"name": n, "teacher_model": "openai/gpt-4o-mini", "settings": json.dumps({"mode": "cascade", "target_agreement": 0.97}),
         "template": None, "origin": "admin", "created": start, "updated": start} for n in names])
    metrics = lambda version: json.dumps({"agreement": 0.93 + 0.02 * version, "coverage_at_target": 0.8,  # noqa: E731
                                          "target_agreement": 0.97, "threshold_at_target": 0.62, "ece": 0.02})
    ledger.insert_rows("students", [
        {"route": n, "version": version, "kind": "label", "created": takeover[n], "train_pairs": 2000, "val_pairs": 500,
         "metrics": metrics(version), "curve": json.dumps(curve), "calibration": "{}", "artifact_path": "", "checksum": "",
         "status": status}
        for n in names for version, status in ((1, "retired"), (2, "live"))])
    request = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Classify: my card was declined"}]})
    shadows: list[dict[str, Any]] = []
    step = (now - start) / max(rows, 1)

    def exchanges() -> Any:
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
            if served == "student" and rng.random() < shadow_rate:
                agree = int(rng.random() < 0.96)
                shadows.append({"ts": ts, "route": route, "exchange_uid": uid, "student_version": version,
                                "student_answer": "card_declined",
                                "teacher_answer": "card_declined" if agree else "declined_transfer",
                                "agree": agree, "cost_usd": teacher_cost})
            yield {"uid": uid, "ts": ts, "route": route, "key_id": "", "endpoint": "chat.completions",
                   "model": "gpt-4o-mini", "teacher_model": "openai/gpt-4o-mini", "request": request,
                   "answer": "card_declined", "finish_reason": "stop", "prompt_tokens": pt, "completion_tokens": ct,
                   "cost_usd": cost, "counterfactual_usd": teacher_cost if status == 200 else 0.0, "latency_ms": latency,
                   "status": status, "served_by": served, "student_version": version, "confidence": conf, "stream": 0}

    ledger.insert_rows("exchanges", exchanges(), fast=True)
    total_shadow = ledger.insert_rows("shadow_checks", shadows, fast=True)
    ledger.close()
    return {"routes": names, "rows": rows, "shadow_checks": int(total_shadow)}


def run_dashboard(*, rows: int = 1_000_000, out: Path | None = Path("bench/results/dashboard.json"), db: str | None = None,
                  routes: int = 12, days: int = 60, repeat: int = 5) -> dict[str, Any]:
    """Seed a ledger, build the rollups, and time the overview and routes-table queries; writes the
    result to ``out`` and returns ``{"rows", "overview_ms", "routes_ms", ...}`` (the slowest of ``repeat``)."""
    from gateway.stats import Stats
    from store import Ledger

    tmp = None
    if not db:
        tmp = tempfile.TemporaryDirectory(prefix="kdgate-bench-")
        db = str(Path(tmp.name) / "ledger.db")
    try:
        t0 = time.perf_counter()
        seeded = seed_ledger(db, rows, routes=routes, days=days)
        seed_s = time.perf_counter() - t0
        print(f"seeded {rows:,} exchanges in {seed_s:.1f}s", file=sys.stderr, flush=True)
        ledger = Ledger(db)
        stats = Stats(ledger, min_interval_s=0.0)
        t0 = time.perf_counter()
        stats.refresh(force=True)
        rollup_ms = (time.perf_counter() - t0) * 1000
        settings = {n: {"mode": "cascade", "threshold": None, "target_agreement": 0.97} for n in seeded["routes"]}
        overview_runs, routes_runs = [], []
        for _ in range(max(1, repeat)):
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
            "rows": rows,
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
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _append_live(db: str, routes: list[str], n: int) -> None:
    from store import Ledger

    ledger = Ledger(db)
    now = time.time()
    ledger.insert_rows("exchanges", [
        {"uid": f"live-{uuid.uuid4().hex}", "ts": now, "route": routes[i % len(routes)], "served_by": "student",
         "status": 200, "latency_ms": 5.0, "cost_usd": 0.0, "counterfactual_usd": 0.0001} for i in range(n)])
    ledger.close()
