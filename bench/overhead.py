"""``kdgate bench overhead``: what the gateway adds on top of a fast upstream, against LiteLLM's proxy.

One run, one machine, the same stand-in upstream: the upstream called directly, through kdgate (logging
on), and through LiteLLM's proxy (``pip install 'kdgate[bench]'``). Each server runs in its own process;
the load generator is an aiohttp client in this one. Reports p50/p99 latency at concurrency 1 and 32
and the throughput at concurrency 32.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run_overhead"]

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 5}


async def _measure(url: str, *, requests_c1: int, seconds_c32: float, headers: dict[str, str]) -> dict[str, float]:
    import aiohttp

    payload = json.dumps(BODY).encode()
    hdrs = {"content-type": "application/json", **headers}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one() -> float:
            t = time.perf_counter()
            async with session.post(url, data=payload, headers=hdrs) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}")
            return (time.perf_counter() - t) * 1000

        for _ in range(50):  # warm-up: connections, caches, JIT-free but lazy imports
            await one()
        c1 = [await one() for _ in range(requests_c1)]
        c32: list[float] = []
        stop_at = time.perf_counter() + seconds_c32

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                c32.append(await one())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(32)))
        elapsed = time.perf_counter() - t0

    def q(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "rps": round(len(c32) / elapsed, 1),
        "p50_ms_c1": round(statistics.median(c1), 3),
        "p99_ms_c1": round(q(c1, 0.99), 3),
        "p50_ms_c32": round(statistics.median(c32), 3),
        "p99_ms_c32": round(q(c32, 0.99), 3),
    }


def run_overhead(*, out: Path | None, requests_c1: int = 500, seconds_c32: float = 10.0, include_litellm: bool = True) -> dict[str, Any]:
    from bench.standin import free_port

    from bench.procs import child_env, spawn as _spawn, stop as _stop, wait_http

    tmp = Path(tempfile.mkdtemp(prefix="kdgate-bench-"))
    env = child_env()
    procs: list[subprocess.Popen] = []
    results: dict[str, Any] = {}
    try:
        up_port = free_port()
        procs.append(_spawn([sys.executable, "-m", "bench.standin", "--port", str(up_port), "--model", "gpt-4o-mini"], env, tmp / "upstream.log"))
        upstream = f"http://127.0.0.1:{up_port}/v1"
        wait_http(upstream + "/models", proc=procs[-1])

        kd_port = free_port()
        kd_env = {**env, "KDGATE_EMBEDDED_DISTILLER": "false"}
        procs.append(_spawn([sys.executable, "-m", "gateway.cli", "serve", "--teacher", "openai/gpt-4o-mini", "--teacher-api-base", upstream,
                             "--db", str(tmp / "bench.db"), "--port", str(kd_port), "--no-auth"], kd_env, tmp / "kdgate.log"))
        wait_http(f"http://127.0.0.1:{kd_port}/healthz", proc=procs[-1])

        targets = {"direct": upstream + "/chat/completions", "kdgate": f"http://127.0.0.1:{kd_port}/v1/chat/completions"}
        headers: dict[str, dict[str, str]] = {}
        if include_litellm and shutil.which("litellm"):
            ll_port = free_port()
            cfg = tmp / "litellm.yaml"
            cfg.write_text(
                "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
                f"      api_base: {upstream}\n      api_key: sk-stand-in\n"
            )
            import secrets

            master = "sk-" + secrets.token_hex(24)  # LiteLLM's proxy refuses to start without one
            headers["litellm"] = {"authorization": f"Bearer {master}"}
            procs.append(_spawn(["litellm", "--config", str(cfg), "--port", str(ll_port), "--host", "127.0.0.1"],
                                {**env, "LITELLM_MASTER_KEY": master}, tmp / "litellm.log"))
            try:
                wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", timeout=180, proc=procs[-1])
                targets["litellm"] = f"http://127.0.0.1:{ll_port}/v1/chat/completions"
            except (RuntimeError, TimeoutError) as exc:
                results["litellm_error"] = str(exc)
        elif include_litellm:
            results["litellm_error"] = "litellm proxy not installed (pip install 'kdgate[bench]')"

        for name, url in targets.items():
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            results[name] = asyncio.run(_measure(url, requests_c1=requests_c1, seconds_c32=seconds_c32,
                                                 headers=headers.get(name, {"authorization": "Bearer sk-stand-in"})))
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    finally:
        for p in reversed(procs):
            _stop(p, timeout=15)
    d, k = results.get("direct"), results.get("kdgate")
    if d and k:
        results["kdgate_added_p50_ms_c1"] = round(k["p50_ms_c1"] - d["p50_ms_c1"], 3)
        if results.get("litellm"):
            results["litellm_added_p50_ms_c1"] = round(results["litellm"]["p50_ms_c1"] - d["p50_ms_c1"], 3)
            results["kdgate_vs_litellm_rps"] = round(k["rps"] / max(results["litellm"]["rps"], 1e-9), 2)
    results["upstream"] = "stand-in OpenAI-compatible server (bench.standin), loopback"
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/overhead.json").write_text(json.dumps(results, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def register(bench_sub: Any) -> None:
    p = bench_sub.add_parser("overhead", help="latency/throughput added by kdgate vs the upstream and LiteLLM's proxy")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--requests", type=int, default=500, help="sequential requests at concurrency 1")
    p.add_argument("--seconds", type=float, default=10.0, help="duration at concurrency 32")
    p.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")

    def run(args: Any) -> int:
        res = run_overhead(out=args.out, requests_c1=args.requests, seconds_c32=args.seconds, include_litellm=not args.no_litellm)
        print(json.dumps(res, indent=2))
        return 0

    p.set_defaults(func=run)
