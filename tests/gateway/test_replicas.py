"""Several gateway replicas on one PostgreSQL ledger agree with each other (issue 15)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from bench.standin import ReplayTeacher, ServerThread
from gateway.auth import create_key
from tests.conftest import ADMIN_KEY, echo_answer
from tests.sql import sql_value

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


@pytest.fixture
def replicas(pg_url, tmp_path):
    """Two gateways (separate apps, separate state) on one PostgreSQL database and one stand-in."""
    from gateway.app import create_app
    from gateway.settings import load_settings

    standin = ReplayTeacher(fallback=echo_answer, model="gpt-4o-mini")
    teacher = ServerThread(standin).start()
    servers = []
    for i in range(2):
        settings = load_settings(db=pg_url, teacher="openai/gpt-4o-mini", teacher_api_base=teacher.url + "/v1",
                                 teacher_api_key="sk-provider-" + "x" * 24, admin_key=ADMIN_KEY, embedded_distiller=False,
                                 artifacts_dir=str(tmp_path / "artifacts"), retry_backoff_s=0.01)
        servers.append(ServerThread(create_app(settings)).start())
    yield standin, servers
    for s in servers:
        s.stop()
    teacher.stop()


def _key(server: Any, **limits: Any) -> str:
    state = server.config.app.state.kdgate
    key_id, key = create_key(state.ledger, "team")
    state.ledger.set_key_limits(key_id, limits)
    return key


def test_requests_per_minute_hold_across_replicas(replicas):
    _, (a, b) = replicas
    key = _key(a, rpm=60)
    statuses: list[int] = []
    lock = threading.Lock()

    def send(server: Any, n: int) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(n):
                code = client.post(server.url + "/v1/chat/completions", json=CHAT,
                                   headers={"authorization": f"Bearer {key}"}).status_code
                with lock:
                    statuses.append(code)

    threads = [threading.Thread(target=send, args=(s, 25)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 100 and statuses.count(200) == 60 and statuses.count(429) == 40


def test_a_budget_holds_across_replicas(replicas):
    standin, (a, b) = replicas
    standin.latency_s = 0.3
    standin.fallback = lambda body: " ".join(["word"] * 15)  # ~15 completion tokens: ~$9e-6 each
    # one request's maximum cost (20 output tokens at gpt-4o-mini's price, ~$1.3e-5) fits 3 times
    key = _key(a, budget_day_usd=4.0e-5)
    codes: list[int] = []

    def one(server: Any) -> None:
        codes.append(httpx.post(server.url + "/v1/chat/completions", json=CHAT,
                                headers={"authorization": f"Bearer {key}"}, timeout=30).status_code)

    threads = [threading.Thread(target=one, args=((a, b)[i % 2],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (a, b):
        s.config.app.state.kdgate.writer.flush(10)
    spent = sql_value(a.config.app.state.kdgate.ledger, "SELECT coalesce(sum(cost_usd), 0) FROM exchanges WHERE status = 200")
    assert 1 <= codes.count(200) <= 3 and set(codes) <= {200, 429}
    assert spent <= 4.0e-5


def test_settings_changed_through_one_replica_reach_the_other(replicas):
    _, (a, b) = replicas
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(a.url + "/admin/routes", json={"name": "triage"}, headers=admin).status_code == 201
    assert httpx.patch(a.url + "/admin/routes/triage", json={"threshold": 0.33}, headers=admin).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = httpx.get(b.url + "/admin/routes/triage", headers=admin)
        if resp.status_code == 200 and resp.json()["settings"].get("threshold") == 0.33:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"replica b never saw the change: {resp.text[:300]}")
    routed = httpx.post(b.url + "/v1/chat/completions", json=CHAT, headers={**admin, "x-kdgate-route": "triage"})
    assert routed.status_code == 200 and routed.headers["x-kdgate-route"] == "triage"


def test_a_dashboard_session_works_on_every_replica(replicas):
    _, (a, b) = replicas
    login = httpx.post(a.url + "/dashboard/login", content=f"key={ADMIN_KEY}",
                       headers={"origin": a.url, "content-type": "application/x-www-form-urlencoded"})
    assert login.status_code == 303
    cookie = login.cookies.get("kdgate_session") or login.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    on_b = httpx.get(b.url + "/admin/overview", cookies={"kdgate_session": cookie})
    assert on_b.status_code == 200, on_b.text[:200]
    figures_a = httpx.get(a.url + "/admin/overview?since=all", cookies={"kdgate_session": cookie}).json()["totals"]
    figures_b = on_b.json()["totals"]
    assert json.dumps(figures_a, sort_keys=True) == json.dumps({**figures_b}, sort_keys=True)
