"""What only PostgreSQL has: commits out of id order, and a server that goes away and comes back."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from store import Ledger
from store.rollups import Rollups
from tests.sql import sql_value


def _row(**extra) -> dict:
    return {"uid": uuid.uuid4().hex, "ts": time.time(), "route": "r", "status": 200, "served_by": "teacher",
            "cost_usd": 0.001, "counterfactual_usd": 0.001, "latency_ms": 5.0, **extra}


def test_a_row_committed_after_a_higher_id_is_rolled_up_once(pg_url):
    """Two writers: the one holding the lower id commits after the rollup already passed a higher
    one. The rollup remembers the hole and folds the row in when it appears, exactly once."""
    import psycopg

    ledger = Ledger(pg_url)
    rollups = Rollups(ledger)
    slow = psycopg.connect(pg_url)  # a transaction left open: its id is taken, its row not visible
    slow.execute("INSERT INTO exchanges (uid, ts, route, status, served_by, cost_usd, counterfactual_usd) "
                 "VALUES (%s, %s, 'r', 200, 'teacher', 0.5, 0.5)", (uuid.uuid4().hex, time.time()))
    ledger.insert_rows("exchanges", [_row() for _ in range(5)])  # higher ids, visible now
    rollups.refresh(force=True)
    assert rollups.totals()["requests"] == 5
    assert sql_value(pg_url, "SELECT count(*) FROM stats_holes") == 1
    slow.commit()
    slow.close()
    rollups.refresh(force=True)
    rollups.refresh(force=True)
    totals = rollups.totals()
    assert totals["requests"] == 6 and totals["cost_usd"] == pytest.approx(0.505)
    assert sql_value(pg_url, "SELECT count(*) FROM stats_holes") == 0


@pytest.fixture
def own_postgres():
    """A server of this test's own, so that stopping it disturbs no other test."""
    from tests.pg import PostgresServer, find_bin_dir

    server = PostgresServer(find_bin_dir(), durable=True).start()
    yield server
    server.stop()


def test_losing_postgres_while_serving_loses_nothing_answered(own_postgres, tmp_path, teacher):
    from bench.standin import ServerThread
    from gateway.app import create_app
    from gateway.settings import load_settings

    _, tserver = teacher
    url = own_postgres.create_database()
    settings = load_settings(db=url, teacher="openai/gpt-4o-mini", teacher_api_base=tserver.url + "/v1",
                             teacher_api_key="sk-" + "p" * 30, auth=False, embedded_distiller=False,
                             artifacts_dir=str(tmp_path / "a"), ledger_flush_ms=20)
    gw = ServerThread(create_app(settings)).start()
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        uids = [httpx.post(gw.url + "/v1/chat/completions", json=body).headers["x-request-id"] for _ in range(5)]
        state = gw.config.app.state.kdgate
        assert state.writer.flush(10)
        own_postgres.kill()
        answered = []
        for _ in range(10):  # the teacher still answers; the rows wait in the writer's queue
            resp = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200
            answered.append(resp.headers["x-request-id"])
        deadline = time.monotonic() + 20
        while httpx.get(gw.url + "/readyz").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["ledger_writable"] is False
        own_postgres.restart()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(gw.url + "/readyz").status_code == 200 and state.writer.depth == 0:
                break
            time.sleep(0.3)
        assert state.writer.flush(30)
        for uid in uids + answered:
            assert sql_value(url, "SELECT count(*) FROM exchanges WHERE uid = ?", (uid,)) == 1, uid
        assert state.writer.dropped == 0
    finally:
        gw.stop()
