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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_overhead"]

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


def run_overhead(*, out: Path | None, requests_c1: int = 500, seconds_c32: float = 10.0, include_litellm: bool = True,
                 results_dir: Path | None = None) -> dict[str, Any]:
    """Measure the stand-in upstream directly, through kdgate and through LiteLLM's proxy; writes and
    returns ``{"direct", "kdgate", "litellm", "kdgate_added_p50_ms_c1", ...}``."""
    from bench.stack import Stack, wait_http
    from bench.standin import free_port

    results: dict[str, Any] = {}
    stack = Stack(Path(tempfile.mkdtemp(prefix="kdgate-bench-")), settings={"embedded_distiller": False}, ready_path="/healthz")
    with stack:
        upstream = f"{stack.teacher_url}/v1"
        targets = {"direct": upstream + "/chat/completions", "kdgate": f"{stack.base_url}/chat/completions"}
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

        for name, url in targets.items():
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            results[name] = asyncio.run(_measure(url, requests_c1=requests_c1, seconds_c32=seconds_c32,
                                                 headers=headers.get(name, {"authorization": "Bearer sk-stand-in"})))
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    d, k = results.get("direct"), results.get("kdgate")
    if d and k:
        results["kdgate_added_p50_ms_c1"] = round(k["p50_ms_c1"] - d["p50_ms_c1"], 3)
        if results.get("litellm"):
            results["litellm_added_p50_ms_c1"] = round(results["litellm"]["p50_ms_c1"] - d["p50_ms_c1"], 3)
            results["kdgate_vs_litellm_rps"] = round(k["rps"] / max(results["litellm"]["rps"], 1e-9), 2)
    results["upstream"] = "stand-in OpenAI-compatible server (bench.standin), loopback"
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results_dir = Path("bench/results") if results_dir is None else results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "overhead.json").write_text(json.dumps(results, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results
