"""Two ``kdgate serve`` processes and one distiller on one PostgreSQL ledger, driven with the official
openai client (issue 15): a route learns, both replicas serve its student, every answered exchange is
in the ledger once, and killing one replica under load loses nothing it answered before its last
flush window while the other keeps serving."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import openai
import pytest

from bench.stack import Stack
from bench.standin import free_port
from tests.gateway.test_router_e2e import _dataset
from tests.sql import sql_rows, sql_value

pytestmark = pytest.mark.slow

FLUSH_MS = 50


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_two_replicas_and_one_distiller_on_one_postgres(pg_url, tmp_path):
    data = _dataset()
    stream = tmp_path / "topics.jsonl"
    stream.write_text("".join(json.dumps({"messages": m, "answer": a}) + "\n" for m, a in data))
    settings = {
        "db": pg_url, "artifacts_dir": str(tmp_path / "artifacts"), "ledger_flush_ms": FLUSH_MS,
        "routes": {"topics": {"aliases": ["topic-model"], "target_agreement": 0.85, "shadow_rate": 0.0}},
        "distiller": {"min_pairs": 40, "finetune": "never", "min_label_examples": 2, "retrain_after_pairs": 40,
                      "poll_seconds": 1.0},
    }
    with Stack(tmp_path / "stack", settings=settings, dataset=stream) as stack:
        second = free_port()
        stack.start_replica(second)
        urls = [stack.url, f"http://127.0.0.1:{second}"]
        clients = [_client(u) for u in urls]
        answered: list[tuple[str, float]] = []
        # teach: both replicas send the teacher's answers to the ledger
        for i, (messages, answer) in enumerate(data[:100]):
            raw = clients[i % 2].chat.completions.with_raw_response.create(model="topic-model", messages=messages)
            assert raw.parse().choices[0].message.content == answer
            answered.append((raw.headers["x-request-id"], time.monotonic()))
        # the one distiller trains; each replica hot-loads the version and both move to cascade
        deadline = time.monotonic() + 240
        served = {u: False for u in urls}
        while time.monotonic() < deadline and not all(served.values()):
            for url, client in zip(urls, clients):
                raw = client.chat.completions.with_raw_response.create(model="topic-model", messages=data[100][0])
                answered.append((raw.headers["x-request-id"], time.monotonic()))
                served[url] = served[url] or raw.headers["x-kdgate-served-by"] == "student"
            time.sleep(1.0)
        assert all(served.values()), f"not every replica served the student: {served}"
        assert sql_value(pg_url, "SELECT count(*) FROM route_events WHERE kind = 'mode.auto_cascade'") == 1
        # load on both, then kill -9 the second replica while its requests are in flight
        stop = threading.Event()
        lock = threading.Lock()
        errors = {"killed": 0, "survivor": 0}

        def load(index: int) -> None:
            client = clients[index]
            j = 0
            while not stop.is_set():
                messages = data[j % len(data)][0]
                j += 1
                try:
                    raw = client.chat.completions.with_raw_response.create(model="topic-model", messages=messages)
                except openai.APIError:
                    with lock:
                        errors["killed" if index == 1 else "survivor"] += 1
                    if index == 1:
                        return
                    continue
                with lock:
                    answered.append((raw.headers["x-request-id"], time.monotonic()))

        threads = [threading.Thread(target=load, args=(i,)) for i in (0, 0, 1, 1)]
        for t in threads:
            t.start()
        time.sleep(4)
        victim = next(p for p in stack.procs if p.args[-1] == "serve" and p is not stack.gateway and p is not stack.teacher)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join()
        assert errors["survivor"] == 0  # the other replica kept serving
        # every exchange answered before the killed replica's last flush window is in the ledger, once
        time.sleep(1)
        rows = sql_rows(pg_url, "SELECT uid, count(*) AS n FROM exchanges GROUP BY uid")
        counts = {r["uid"]: r["n"] for r in rows}
        window = 2 * FLUSH_MS / 1000 + 0.25
        missing = [uid for uid, at in answered if at < killed_at - window and uid not in counts]
        assert not missing, f"{len(missing)} answered exchanges lost: {missing[:3]}"
        assert all(n == 1 for n in counts.values())
