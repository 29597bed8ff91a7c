"""``kdgate bench soak`` and ``kdgate bench crash``: load held, memory over time, exchanges lost.

Both spawn the stand-in teacher (``python -m bench.standin``) and ``kdgate serve`` as child processes
on loopback and drive the gateway with an aiohttp client in this process, one connection per worker,
each worker looping requests. Every answered request's ``x-request-id`` is kept and looked up in the
ledger afterwards.

- soak: ``--connections`` workers for ``--minutes``; the gateway's RSS is sampled every few seconds;
  then SIGTERM (a clean stop drains the ledger queue) and every answered exchange must be in the ledger.
- crash: load for ``--seconds``, then SIGKILL. An exchange answered before the last flush window
  (``ledger_flush_ms`` x 2 + a margin, see :data:`FLUSH_MARGIN_S`) must be in the ledger; one answered
  within it may be lost. The database must pass SQLite's integrity check and the gateway must start
  again on it.

The teacher is a stand-in (no paid API here) and results say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stack import Stack, write_results

log = logging.getLogger(__name__)

__all__ = ["run_soak", "run_crash", "FLUSH_MARGIN_S"]

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Is this message positive or negative? I love it."}], "max_tokens": 5}
# The writer waits up to flush_ms for a first row and up to flush_ms more to fill a batch, then commits:
# an answered row is committed at most 2 x flush_ms (plus the commit itself) after it was queued.
FLUSH_MARGIN_S = 0.25
RSS_EVERY_S = 5.0


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def robust_stack(workdir: Path, *, flush_ms: float = 50.0, dataset: Path | None = None, student: bool = False) -> Stack:
    """The stand-in teacher and ``kdgate serve``; with ``student``, its embedded distiller set to let a
    student take over quickly (a load test, not a quality test)."""
    settings: dict[str, Any] = {"ledger_flush_ms": flush_ms, "log_level": "warning", "embedded_distiller": student}
    if student:
        settings.update(default_target_agreement=0.9, distiller={"poll_seconds": 1.0, "finetune": "never"})
    return Stack(workdir, settings=settings, dataset=dataset)


async def _load(url: str, *, connections: int, seconds: float, gateway_pid: int | None = None,
                answered: list[tuple[str, float]], errors: dict[str, int], rss: list[float],
                payloads: list[bytes] | None = None, served: dict[str, int] | None = None) -> int:
    """``connections`` workers, each looping requests until ``seconds`` pass; returns requests sent."""
    import aiohttp

    payloads = payloads or [json.dumps(BODY).encode()]
    headers = {"content-type": "application/json"}
    stop_at = time.monotonic() + seconds
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.monotonic() < stop_at:
            payload = payloads[sent % len(payloads)]
            sent += 1
            try:
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        answered.append((resp.headers.get("x-request-id", ""), time.time()))
                        if served is not None:
                            who = resp.headers.get("x-kdgate-served-by", "?")
                            served[who] = served.get(who, 0) + 1
                    else:
                        errors[f"status {resp.status}"] = errors.get(f"status {resp.status}", 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.05)

    async def sampler() -> None:
        import psutil

        proc = psutil.Process(gateway_pid)
        last_report = time.monotonic()
        while time.monotonic() < stop_at:
            try:
                rss.append(round(proc.memory_info().rss / 2**20, 1))
            except psutil.Error:
                return
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                _progress(f"{len(answered)} answered, {sum(errors.values())} errors, rss {rss[-1]} MB")
            await asyncio.sleep(min(RSS_EVERY_S, max(0.0, stop_at - time.monotonic())))

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [worker(session) for _ in range(connections)]
        if gateway_pid is not None:
            tasks.append(sampler())
        await asyncio.gather(*tasks)
    return sent


def _ledger_uids(db: Path) -> set[str]:
    from store import Ledger

    ledger = Ledger(db)
    try:
        return ledger.uids()
    finally:
        ledger.close()


def _integrity(db: Path) -> tuple[bool, str]:
    from store import Ledger

    ledger = Ledger(db)
    try:
        text = "; ".join(ledger.integrity_check())
    finally:
        ledger.close()
    return text == "ok", text


def _warm_student(stack: Stack, rows: list[dict[str, Any]], *, first: int, timeout_s: float = 300.0,
                  chunk: int = 250, every_s: float = 30.0) -> tuple[dict[str, Any], int]:
    """Send teacher traffic until the embedded distiller has a live student and the route cascades.

    ``first`` requests go out at once. While no student is in cascade mode the traffic goes on, as
    it would in production: ``chunk`` more requests every ``every_s`` seconds (whether a version is
    certified on the first pairs depends on which pairs the distiller's first runs happened to see).
    Returns the live student and how many of ``rows`` the warm-up used.
    """
    import httpx

    def send(batch: list[dict[str, Any]]) -> None:
        for row in batch:
            client.post(stack.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": row["messages"]})

    with httpx.Client(timeout=60) as client:
        used = min(first, len(rows))
        send(rows[:used])
        deadline = time.monotonic() + timeout_s
        more_at = time.monotonic() + every_s
        while time.monotonic() < deadline:
            routes = client.get(stack.url + "/admin/routes").json()
            ready = [r for r in routes if r.get("student") and r["settings"].get("mode") == "cascade"]
            if ready:
                return {"route": ready[0]["name"], "version": ready[0]["student"]["version"]}, used
            if time.monotonic() >= more_at and used < len(rows):
                send(rows[used:used + chunk])
                used = min(used + chunk, len(rows))
                more_at = time.monotonic() + every_s
            time.sleep(2)
    raise TimeoutError(f"no student reached cascade mode during the warm-up ({used} teacher requests)")


def run_soak(*, minutes: float, connections: int = 500, out: Path | None = None, student: bool = True,
             warmup: int = 1500) -> dict[str, Any]:
    """Hold ``connections`` concurrent connections for ``minutes``; report errors, RSS and lost exchanges.

    With ``student`` (the default) the stream is the bundled banking77 one: a warm-up of ``warmup``
    teacher requests (more while no student is in cascade mode) lets the embedded distiller train a
    student, and the load then runs against a route in cascade mode (student answers and escalations to the stand-in teacher).
    """
    from bench.replay import demo_stream

    workdir = Path(tempfile.mkdtemp(prefix="kdgate-soak-"))
    rows = demo_stream() if student else []
    dataset = None
    if student:
        dataset = workdir / "stream.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stack = robust_stack(workdir, dataset=dataset, student=student)
    answered: list[tuple[str, float]] = []
    errors: dict[str, int] = {}
    served: dict[str, int] = {}
    rss: list[float] = []
    live: dict[str, Any] = {}
    try:
        stack.start()
        if student:
            _progress(f"warm-up: {warmup} teacher requests, then waiting for a student in cascade mode")
            live, warmup = _warm_student(stack, rows, first=warmup)
            _progress(f"student v{live['version']} serves route {live['route']} in cascade mode "
                      f"after {warmup} teacher requests")
        payloads = [json.dumps({"model": "gpt-4o-mini", "messages": r["messages"]}).encode() for r in rows[warmup:]] or None
        _progress(f"soak: {connections} connections for {minutes:g} min against {stack.url} (workdir {workdir})")
        t0 = time.monotonic()
        sent = asyncio.run(_load(stack.url + "/v1/chat/completions", connections=connections, seconds=minutes * 60,
                                 gateway_pid=stack.gateway.pid, answered=answered, errors=errors, rss=rss,
                                 payloads=payloads, served=served))
        elapsed = time.monotonic() - t0
        _progress("load done; stopping the gateway with SIGTERM")
        code = stack.stop_gateway(signal.SIGTERM)
        in_ledger = _ledger_uids(stack.db)
        ok, _ = _integrity(stack.db)
    finally:
        stack.stop()
    lost = [uid for uid, _ in answered if uid not in in_ledger]
    results = {
        "requests": sent,
        "answered": len(answered),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "lost": len(lost),
        "lost_sample": lost[:10],
        "rss_start_mb": rss[0] if rss else None,
        "rss_end_mb": rss[-1] if rss else None,
        "rss_max_mb": max(rss) if rss else None,
        "rss_samples_mb": rss,
        "warmup_requests": warmup if student else 0,
        "rss_every_s": RSS_EVERY_S,
        "rps": round(len(answered) / max(elapsed, 1e-9), 1),
        "minutes": minutes,
        "connections": connections,
        "student": bool(student),
        "served_by": served,
        "student_version": live.get("version"),
        "gateway_exit_code": code,
        "integrity_ok": ok,
        "teacher": "stand-in OpenAI-compatible server (bench.standin) replaying the bundled banking77 stream, loopback"
        if student else "stand-in OpenAI-compatible server (bench.standin), loopback",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_results(results, "soak", out)
    return results


def run_crash(
    *, seconds: float = 20.0, connections: int = 100, out: Path | None = None, flush_ms: float = 50.0, results_dir: Path | None = None
) -> dict[str, Any]:
    """Load, SIGKILL the gateway, then count answered exchanges missing from the ledger."""
    workdir = Path(tempfile.mkdtemp(prefix="kdgate-crash-"))
    stack = robust_stack(workdir, flush_ms=flush_ms)
    answered: list[tuple[str, float]] = []
    errors: dict[str, int] = {}
    kill_at: list[float] = []

    async def load_then_kill() -> None:
        async def killer() -> None:
            await asyncio.sleep(seconds)
            kill_at.append(time.time())
            stack.kill_gateway()
            _progress("gateway killed with SIGKILL")

        # the load runs a little past the kill so that requests are in flight when it lands
        await asyncio.gather(
            _load(stack.url + "/v1/chat/completions", connections=connections, seconds=seconds + 1.0,
                  answered=answered, errors=errors, rss=[]),
            killer(),
        )

    ok, integrity, in_ledger, restarted = False, "not checked", set(), False
    try:
        stack.start()
        _progress(f"crash: {connections} connections for {seconds:g}s, then SIGKILL (workdir {workdir})")
        asyncio.run(load_then_kill())
        stack.gateway.wait(30)
        ok, integrity = _integrity(stack.db)
        in_ledger = _ledger_uids(stack.db)
        _progress("restarting the gateway on the same database")
        stack.start_gateway()
        restarted = True
        stack.stop_gateway(signal.SIGTERM)
    except (RuntimeError, TimeoutError) as exc:
        log.warning("restart failed: %s", exc)
    finally:
        stack.stop()
    t_kill = kill_at[0] if kill_at else time.time()
    window_s = 2 * flush_ms / 1000 + FLUSH_MARGIN_S
    before = [(u, t) for u, t in answered if t < t_kill - window_s]
    within = [(u, t) for u, t in answered if t >= t_kill - window_s]
    lost_before = [u for u, _ in before if u not in in_ledger]
    lost_within = [u for u, _ in within if u not in in_ledger]
    results = {
        "answered": len(answered),
        "in_ledger": sum(1 for u, _ in answered if u in in_ledger),
        "lost_after_last_flush": len(lost_within),
        "lost_before_last_flush": len(lost_before),
        "answered_within_window": len(within),
        "window_ms": round(window_s * 1000),
        "window_rule": f"2 x ledger_flush_ms ({flush_ms:g} ms) + {FLUSH_MARGIN_S * 1000:.0f} ms margin before the SIGKILL",
        "integrity_ok": ok,
        "integrity_check": integrity,
        "restarted_ok": restarted,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": seconds,
        "connections": connections,
        "lost_sample": lost_before[:10],
        "lost_oldest_ms_before_kill": round(max((t_kill - t for u, t in answered if u not in in_ledger), default=0.0) * 1000),
        "teacher": "stand-in OpenAI-compatible server (bench.standin), loopback",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_results(results, "crash", out, results_dir)
    return results
