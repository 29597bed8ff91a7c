"""``kdgate bench overhead``: what the gateway adds on top of a fast upstream, against LiteLLM's proxy.

One run, one machine, the same stand-in upstream: the upstream called directly, through kdgate (logging
on), and through LiteLLM's proxy (``pip install 'kdgate[bench]'``). Each server runs in its own process;
the load generator is an aiohttp client in this one. Reports p50/p99 latency at concurrency 1 and 32
and the throughput at concurrency 32; the concurrency-1 requests are interleaved over the targets.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_overhead", "run_replicas"]

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 5}
# The same request on the other surfaces (``--surface``), and the upstream path the gateway calls for
# each with an OpenAI teacher: Responses natively, Messages through its chat form.
SURFACES: dict[str, tuple[str, dict[str, Any], str]] = {
    "responses": ("/responses", {"model": "gpt-4o-mini", "input": "Say ok.", "max_output_tokens": 5}, "/responses"),
    "messages": ("/messages", {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "Say ok."}]},
                 "/chat/completions"),
}


def _quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def _measure(targets: dict[str, tuple[str, dict[str, Any], dict[str, str]]], *, requests_c1: int,
                   seconds_c32: float) -> dict[str, dict[str, float]]:
    """Each target (name: url, body, headers) at concurrency 1 and 32. The concurrency-1 requests go
    round-robin over the targets (one to each, then again), so that a busy moment on this shared
    machine lands on all of them alike and their medians compare; the concurrency-32 phases run one
    target after the other."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        def caller(name: str) -> Any:
            url, body, headers = targets[name]
            payload = json.dumps(body).encode()
            hdrs = {"content-type": "application/json", **headers}

            async def one() -> float:
                t = time.perf_counter()
                async with session.post(url, data=payload, headers=hdrs) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")
                return (time.perf_counter() - t) * 1000

            return one

        calls = {name: caller(name) for name in targets}
        for one in calls.values():
            for _ in range(50):  # warm-up: connections, caches, lazy imports
                await one()
        c1: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(requests_c1):
            for name, one in calls.items():
                c1[name].append(await one())
        results = {}
        for name, one in calls.items():
            print(f"measuring {name} at concurrency 32 ...", file=sys.stderr, flush=True)
            c32: list[float] = []
            stop_at = time.perf_counter() + seconds_c32

            async def worker() -> None:
                while time.perf_counter() < stop_at:
                    c32.append(await one())

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(32)))
            elapsed = time.perf_counter() - t0
            results[name] = {
                "rps": round(len(c32) / elapsed, 1),
                "p50_ms_c1": round(statistics.median(c1[name]), 3),
                "p99_ms_c1": round(_quantile(c1[name], 0.99), 3),
                "p50_ms_c32": round(statistics.median(c32), 3),
                "p99_ms_c32": round(_quantile(c32, 0.99), 3),
            }
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def run_overhead(*, out: Path | None, requests_c1: int = 500, seconds_c32: float = 10.0, include_litellm: bool = True,
                 results_dir: Path | None = None, dbs: tuple[str, ...] = (), surfaces: tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure the stand-in upstream directly, through kdgate and through LiteLLM's proxy; writes and
    returns ``{"direct", "kdgate", "litellm", "kdgate_added_p50_ms_c1", ...}``.

    ``dbs``: more ledgers to measure kdgate on, side by side in the same run (``postgresql://...``,
    or ``postgresql`` for a temporary server started here): ``kdgate@postgresql`` beside ``kdgate``
    (SQLite), with ``postgresql_added_p50_ms_c1`` (over SQLite's) and ``postgresql_vs_sqlite_rps``.

    ``surfaces``: ``responses`` and/or ``messages``, measured beside chat in the same run: the same
    request on that surface through kdgate (``kdgate@responses``) and the upstream path kdgate calls
    for it directly (``direct@responses``: the stand-in's own /responses; Messages through an OpenAI
    teacher is its chat form, so ``direct@messages`` is the chat call), with ``responses_added_p50_ms_c1``
    and ``responses_vs_chat_added_p50_ms`` (its added p50 minus chat's)."""
    unknown = [x for x in surfaces if x not in SURFACES]
    if unknown:
        raise ValueError(f"unknown surface(s) {', '.join(unknown)}; choose from {', '.join(SURFACES)}")
    import contextlib

    from bench.stack import Stack, wait_http
    from bench.standin import free_port

    results: dict[str, Any] = {}
    stack = Stack(Path(tempfile.mkdtemp(prefix="kdgate-bench-")), settings={"embedded_distiller": False}, ready_path="/healthz")
    with stack, contextlib.ExitStack() as extra:
        upstream = f"{stack.teacher_url}/v1"
        targets = {"direct": upstream + "/chat/completions", "kdgate": f"{stack.base_url}/chat/completions"}
        bodies: dict[str, dict[str, Any]] = {}
        for surface in surfaces:
            path, body, upstream_path = SURFACES[surface]
            targets[f"direct@{surface}"] = upstream + upstream_path
            targets[f"kdgate@{surface}"] = stack.base_url + path
            bodies[f"kdgate@{surface}"] = body
            bodies[f"direct@{surface}"] = body if upstream_path == path else BODY
        for db in dbs:  # the same gateway settings on another ledger, against the same upstream
            url = extra.enter_context(_postgres_url()) if db == "postgresql" else db
            port = free_port()
            extra.enter_context(_replicas(stack, url, [port]))
            targets["kdgate@postgresql"] = f"http://127.0.0.1:{port}/v1/chat/completions"
        headers: dict[str, dict[str, str]] = {}
        if include_litellm and shutil.which("litellm"):
            ll_port = free_port()
            cfg = stack.workdir / "litellm.yaml"
            cfg.write_text(
                "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
                f"      api_base: {upstream}\n      api_key: sk-stand-in\n"
            )
            import secrets

            master = "sk-" + secrets.token_hex(24)  # LiteLLM's proxy refuses to start without one
            headers["litellm"] = {"authorization": f"Bearer {master}"}
            proxy = stack.spawn("litellm", ["litellm", "--config", str(cfg), "--port", str(ll_port), "--host", "127.0.0.1"],
                                env={"LITELLM_MASTER_KEY": master})
            try:
                wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", timeout=180, proc=proxy)
                targets["litellm"] = f"http://127.0.0.1:{ll_port}/v1/chat/completions"
            except (RuntimeError, TimeoutError) as exc:
                results["litellm_error"] = str(exc)
        elif include_litellm:
            results["litellm_error"] = "litellm proxy not installed (pip install 'kdgate[bench]')"

        print(f"measuring {', '.join(targets)} at concurrency 1, interleaved ...", file=sys.stderr, flush=True)
        results.update(asyncio.run(_measure(
            {name: (url, bodies.get(name, BODY), headers.get(name, {"authorization": "Bearer sk-stand-in"}))
             for name, url in targets.items()},
            requests_c1=requests_c1, seconds_c32=seconds_c32)))
    d, k = results.get("direct"), results.get("kdgate")
    pg = results.get("kdgate@postgresql")
    if d and k and pg:
        results["postgresql_added_p50_ms_c1"] = round(pg["p50_ms_c1"] - k["p50_ms_c1"], 3)
        results["postgresql_vs_sqlite_rps"] = round(pg["rps"] / max(k["rps"], 1e-9), 3)
    if d and k:
        results["kdgate_added_p50_ms_c1"] = round(k["p50_ms_c1"] - d["p50_ms_c1"], 3)
        for surface in surfaces:
            ks, ds = results.get(f"kdgate@{surface}"), results.get(f"direct@{surface}")
            if ks and ds:
                added = round(ks["p50_ms_c1"] - ds["p50_ms_c1"], 3)
                results[f"{surface}_added_p50_ms_c1"] = added
                results[f"{surface}_vs_chat_added_p50_ms"] = round(added - results["kdgate_added_p50_ms_c1"], 3)
                results[f"{surface}_vs_chat_rps"] = round(ks["rps"] / max(k["rps"], 1e-9), 3)
        if results.get("litellm"):
            results["litellm_added_p50_ms_c1"] = round(results["litellm"]["p50_ms_c1"] - d["p50_ms_c1"], 3)
            results["kdgate_vs_litellm_rps"] = round(k["rps"] / max(results["litellm"]["rps"], 1e-9), 2)
    results["upstream"] = "stand-in OpenAI-compatible server (bench.standin), loopback"
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from bench.stack import write_results

    write_results(results, "overhead", out, results_dir)
    return results


def _postgres_url() -> Any:
    """A temporary PostgreSQL server (Debian's binaries) for a bench given no DSN: a context manager
    yielding a fresh database's DSN."""
    import contextlib

    from bench.postgres import PostgresServer, find_bin_dir

    @contextlib.contextmanager
    def server() -> Any:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql), and no --db DSN given")
        pg = PostgresServer(bin_dir, durable=True).start()
        try:
            yield pg.create_database()
        finally:
            pg.stop()

    return server()


def _replicas(stack: Any, url: str, ports: list[int]) -> Any:
    """``kdgate serve`` replicas on ledger ``url``, with the stack's settings, until the block ends."""
    import contextlib
    import os
    import signal

    @contextlib.contextmanager
    def running() -> Any:
        procs = []
        try:
            for port in ports:
                env = {"KDGATE_DB": url, "KDGATE_PORT": str(port), "KDGATE_EMBEDDED_DISTILLER": "false"}
                procs.append(stack.spawn(f"replica-{port}", [sys.executable, "-m", "cli", "--config", str(stack.config), "serve"],
                                         env=env))
            for port, proc in zip(ports, procs):
                from bench.stack import wait_http

                wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
            yield procs
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.wait(60)

    return running()


async def _load(urls: list[str], *, seconds: float, concurrency: int) -> dict[str, Any]:
    """``concurrency`` clients sending requests round-robin over ``urls`` for ``seconds``."""
    import aiohttp

    payload = json.dumps(BODY).encode()
    hdrs = {"content-type": "application/json", "authorization": "Bearer sk-stand-in"}
    latencies: list[float] = []
    uids: list[str] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as session:
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            n = i
            while time.perf_counter() < stop_at:
                url = urls[n % len(urls)]
                n += 1
                t = time.perf_counter()
                async with session.post(url, data=payload, headers=hdrs) as resp:
                    await resp.read()
                    if resp.status == 200:
                        latencies.append((time.perf_counter() - t) * 1000)
                        uids.append(resp.headers.get("x-request-id", ""))
                    else:
                        errors += 1

        for url in urls:  # warm-up
            for _ in range(20):
                async with session.post(url, data=payload, headers=hdrs) as resp:
                    await resp.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    xs = sorted(latencies)
    return {"rps": round(len(xs) / elapsed, 1), "p50_ms": round(statistics.median(xs), 3) if xs else None,
            "p99_ms": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3) if xs else None,
            "requests": len(xs), "errors": errors, "uids": uids}


def run_replicas(*, replicas: tuple[int, ...] = (1, 2), db: str | None = None, seconds: float = 15.0,
                 concurrency: int = 32, out: Path | None = None, results_dir: Path | None = None) -> dict[str, Any]:
    """Throughput and p50/p99 of 1, 2, ... gateway replicas on one PostgreSQL ledger against the same
    stand-in upstream, the load spread round-robin over them; afterwards every answered exchange is
    looked up in the ledger (``lost``: answered but not there). Writes ``replicas.json``."""
    import contextlib
    import os

    from bench.stack import Stack
    from bench.standin import free_port
    from store import Ledger

    results: dict[str, Any] = {"replicas": {}, "upstream": "stand-in OpenAI-compatible server (bench.standin), loopback",
                               "cpus": os.cpu_count(), "concurrency": concurrency, "seconds": seconds}
    stack = Stack(Path(tempfile.mkdtemp(prefix="kdgate-replicas-")), settings={"embedded_distiller": False},
                  ready_path="/healthz")
    with stack, contextlib.ExitStack() as extra:
        url = db or extra.enter_context(_postgres_url())
        for n in replicas:
            ports = [free_port() for _ in range(n)]
            with _replicas(stack, url, ports):
                print(f"measuring {n} replica(s) ...", file=sys.stderr, flush=True)
                figures = asyncio.run(_load([f"http://127.0.0.1:{p}/v1/chat/completions" for p in ports],
                                            seconds=seconds, concurrency=concurrency))
            uids = figures.pop("uids")  # the replicas were stopped cleanly: their queues are drained
            ledger = Ledger(url)
            stored = ledger.uids()
            ledger.close()
            figures["lost"] = sum(1 for u in uids if u not in stored)
            results["replicas"][str(n)] = figures
            print(f"  {n}: {figures}", file=sys.stderr, flush=True)
    one, two = results["replicas"].get("1"), results["replicas"].get("2")
    if one and two:
        results["two_vs_one_rps"] = round(two["rps"] / max(one["rps"], 1e-9), 3)
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from bench.stack import write_results

    write_results(results, "replicas", out, results_dir)
    return results
