"""Per-key limits, the teacher's circuit breaker and fallbacks, and the bounded ledger queue."""

from __future__ import annotations

import sqlite3
import time

import httpx
import openai
import pytest

from store import Ledger, LedgerWriter
from bench.standin import ReplayTeacher, ServerThread
from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.both_backends

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def _key(gw, **limits) -> str:
    r = httpx.post(gw.url + "/admin/keys", json={"name": "limited", **limits}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def test_requests_per_minute_limit(make_gateway):
    gw = make_gateway()
    created = _key(gw, rpm=3)
    client = openai.OpenAI(base_url=gw.base_url, api_key=created["key"], max_retries=0)
    for _ in range(3):
        client.chat.completions.create(**BODY)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(**BODY)
    assert err.value.status_code == 429 and err.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    # the admin lifts the limit: next request passes
    r = httpx.patch(gw.url + f"/admin/keys/{created['id']}", json={"rpm": None}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["rpm"] is None
    client.chat.completions.create(**BODY)


def test_daily_budget_refuses_before_the_teacher_is_called(make_gateway, teacher):
    standin, _ = teacher
    gw = make_gateway()
    created = _key(gw, budget_day_usd=1e-4)
    client = openai.OpenAI(base_url=gw.base_url, api_key=created["key"], max_retries=0)
    client.chat.completions.create(**BODY, max_tokens=16)  # at most ~1e-5: fits the budget
    calls = standin.calls
    # Without max_tokens the request could cost gpt-4o-mini's 16,384 output tokens (~$0.0098): more
    # than is left, so it is refused before the teacher is called (budgets never overshoot).
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(**BODY)
    assert err.value.body["code"] == "insufficient_quota"
    assert standin.calls == calls  # refused before the teacher


def test_tokens_per_minute_limit(make_gateway):
    gw = make_gateway()
    created = _key(gw, tpm=20)
    client = openai.OpenAI(base_url=gw.base_url, api_key=created["key"], max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four five six"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four five six"}])


def test_circuit_opens_and_fallback_teacher_answers(make_gateway, teacher):
    standin, _ = teacher
    backup = ReplayTeacher(fallback=lambda body: "from the fallback", model="gpt-4o")
    with ServerThread(backup) as backup_server:
        gw = make_gateway(
            auth=False, teacher_retries=0, breaker_failures=2, breaker_reset_s=60,
            routes={"r": {"aliases": ["gpt-4o-mini"], "fallback_teachers": [{"model": "openai/gpt-4o", "api_base": backup_server.url + "/v1"}]}},
        )
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
        standin.fault = "500"
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(**BODY)
            assert raw.parse().choices[0].message.content == "from the fallback"
            assert raw.headers["x-kdgate-teacher"] == "openai/gpt-4o"
        calls = standin.calls
        # the primary's circuit is open after 2 failures: it is not called again while open
        client.chat.completions.create(**BODY)
        assert standin.calls == calls
        ready = httpx.get(gw.url + "/readyz").json()
        assert "open" in ready["checks"]["teacher_circuits"].values()
        standin.fault = None


def test_ledger_outage_does_not_fail_requests_and_drops_are_counted(tmp_path):
    db = tmp_path / "l.db"
    Ledger(db)
    writer = LedgerWriter(db, flush_ms=10, max_queue=5)
    writer.start()
    locker = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the database is locked by someone else
    try:
        for i in range(12):
            writer.submit({"uid": f"u{i}", "ts": time.time(), "route": "r", "status": 200})
        time.sleep(0.5)
        # the writer waits on the lock with its rows in hand; the queue filled up; the rest was counted
        assert writer.dropped > 0  # counted, never silent; the rows the writer holds wait for the lock
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert writer.flush(30)
    kept = Ledger(db).count_exchanges()
    assert writer.dropped > 0 and kept + writer.dropped == 12 and kept >= writer.max_queue
    writer.close()


def test_teacher_down_student_answers_only_where_allowed(make_gateway, teacher):
    """Covered end to end in test_router_e2e with a trained student; here: the default refuses."""
    standin, _ = teacher
    gw = make_gateway(auth=False, teacher_retries=0)
    standin.fault = "503"
    r = httpx.post(gw.url + "/v1/chat/completions", json=BODY)
    standin.fault = None
    assert r.status_code == 503 and r.json()["error"]["message"]
