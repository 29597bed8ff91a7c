"""The store on both backends (issue 15): the same migrations make the same schema, the writer keeps
its contract, the rollups count every row once, and bad states get clear errors, never secrets."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest

from store import Ledger, LedgerWriter, SchemaTooNew, StoreError, WorkerLock, redact
from store.migrate import applied_migrations
from store.rollups import Rollups
from store.schema import MIGRATIONS
from tests.sql import sql_exec, sql_rows, sql_value

pytestmark = pytest.mark.both_backends


def _row(route: str = "r", **extra) -> dict:
    return {"uid": uuid.uuid4().hex, "ts": time.time(), "route": route, "status": 200, "served_by": "teacher",
            "cost_usd": 0.001, "counterfactual_usd": 0.002, "latency_ms": 10.0, "endpoint": "chat.completions",
            "answer": "a", "request": json.dumps({"messages": [{"role": "user", "content": "x"}]}), **extra}


def _columns(url: str, backend: str) -> set[tuple[str, str]]:
    if backend == "sqlite":
        tables = [r["name"] for r in sql_rows(url, "SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {(t, c["name"]) for t in tables for c in sql_rows(url, f"PRAGMA table_info({t})")}
    return {(r["table_name"], r["column_name"]) for r in sql_rows(
        url, "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()")}


def _declared() -> set[tuple[str, str]]:
    from store.schema import AddColumn, Table

    out = {("_migrations", "name"), ("_migrations", "applied_at")}
    for m in MIGRATIONS:
        for step in m.steps:
            if isinstance(step, Table):
                out |= {(step.name, c) for c, _ in step.columns}
            elif isinstance(step, AddColumn):
                out.add((step.table, step.column))
    return out


EXPECTED_TABLES = {"exchanges", "routes", "api_keys", "embeddings", "students", "route_events", "shadow_checks",
                   "stats_hourly", "stats_latency", "stats_shadow", "stats_watermark", "stats_holes", "generations",
                   "rate_events", "key_spend", "budget_holds", "sessions", "responses", "_migrations"}


def test_the_same_named_migrations_make_the_same_schema(db_url, backend):
    ledger = Ledger(db_url)
    assert applied_migrations(ledger.conn) == sorted(m.name for m in MIGRATIONS)
    cols = _columns(db_url, backend)
    assert {t for t, _ in cols} == EXPECTED_TABLES
    # the schema both backends end up with: a fixed set of (table, column)
    assert ("exchanges", "student_answer") in cols and ("api_keys", "routes") in cols
    assert cols == _declared()  # exactly what the migrations declare, on either backend
    Ledger(db_url).close()  # opening again applies nothing
    assert sql_value(db_url, "SELECT count(*) FROM _migrations") == len(MIGRATIONS)


def test_a_schema_newer_than_the_code_is_refused(db_url):
    Ledger(db_url).close()
    sql_exec(db_url, "INSERT INTO _migrations (name, applied_at) VALUES ('999_from_the_future', 0)")
    with pytest.raises(SchemaTooNew, match="999_from_the_future"):
        Ledger(db_url)


def test_the_writer_batches_and_loses_nothing_on_a_clean_shutdown(db_url):
    Ledger(db_url).close()
    writer = LedgerWriter(db_url, flush_ms=20, batch_size=200)
    writer.start()
    rows = [_row() for _ in range(1500)]
    for r in rows:
        assert writer.submit(r)
    writer.submit(rows[0])  # the same uid twice: written once
    writer.close()
    assert sql_value(db_url, "SELECT count(*) FROM exchanges") == 1500
    assert sql_value(db_url, "SELECT count(DISTINCT uid) FROM exchanges") == 1500


def test_rollups_count_each_row_once_across_refreshes(db_url):
    ledger = Ledger(db_url)
    rollups = Rollups(ledger)
    ledger.insert_rows("exchanges", [_row() for _ in range(30)])
    rollups.refresh(force=True)
    ledger.insert_rows("exchanges", [_row(route="s", served_by="student", confidence=0.9) for _ in range(20)])
    ledger.insert_rows("shadow_checks", [{"ts": time.time(), "route": "s", "exchange_uid": "x", "student_version": 1,
                                          "student_answer": "a", "teacher_answer": "a", "agree": 1, "cost_usd": 0.5}])
    rollups.refresh(force=True)
    rollups.refresh(force=True)
    totals = rollups.totals()
    assert totals["requests"] == 50 and totals["student"] == 20 and totals["checks"] == 1
    assert totals["cost_usd"] == pytest.approx(0.05) and totals["check_cost_usd"] == pytest.approx(0.5)
    hist = rollups.latency_histograms()
    assert sum(sum(v.values()) for v in hist.values()) == 50


def test_the_worker_lock_admits_one_distiller_per_ledger(db_url):
    Ledger(db_url).close()
    first = WorkerLock.acquire(db_url)
    try:
        with pytest.raises(StoreError, match="Another distiller worker"):
            WorkerLock.acquire(db_url)
    finally:
        first.release()
    WorkerLock.acquire(db_url).release()  # free again once released


def test_copy_keeps_every_row_and_new_rows_get_new_ids(db_url, tmp_path):
    from cli.app import main

    src = tmp_path / "old.db"
    old = Ledger(src)
    old.insert_rows("exchanges", [_row(key_id="key_a", ts=time.time() - i) for i in range(120)])
    old.upsert_route("r", teacher_model="openai/gpt-4o-mini", settings={"mode": "cascade"})
    old.add_key("key_a", "team", "h" * 64)
    old.close()
    assert main(["db", "copy", "--from", f"sqlite:///{src}", "--to", db_url, "--json"]) == 0
    new = Ledger(db_url)
    assert new.count_exchanges() == 120 and new.route("r")["settings"] == {"mode": "cascade"}
    writer = LedgerWriter(db_url)
    writer.start()
    writer.submit(_row())
    writer.close()
    assert new.count_exchanges() == 121  # the copied ids did not collide with the next one
    assert main(["db", "copy", "--from", f"sqlite:///{src}", "--to", db_url]) == 2  # not into a full ledger
    assert main(["db", "check", "--db", db_url]) == 0


def test_secrets_of_a_dsn_never_reach_a_message_or_a_log(caplog, backend):
    caplog.set_level(logging.DEBUG)
    url = "postgresql://kdgate:s3cr3t-passw0rd@127.0.0.1:1/kdgate"
    assert redact(url) == "postgresql://kdgate:***@127.0.0.1:1/kdgate"
    with pytest.raises(StoreError) as err:
        Ledger(url)
    assert "127.0.0.1:1" in str(err.value) and "s3cr3t" not in str(err.value)
    assert "s3cr3t" not in caplog.text


def test_kdgate_db_and_db_file_settings(tmp_path, monkeypatch, backend):
    from gateway.settings import load_settings

    secret = tmp_path / "dsn"
    secret.write_text("postgresql://u:p@db.internal:5432/kdgate\n")
    monkeypatch.setenv("KDGATE_DB_FILE", str(secret))
    assert load_settings().db == "postgresql://u:p@db.internal:5432/kdgate"
    monkeypatch.setenv("KDGATE_DB", str(tmp_path / "x.db"))
    assert load_settings().db == str(tmp_path / "x.db")  # KDGATE_DB wins over the file


def test_serve_exits_with_a_message_when_postgres_is_unreachable(capsys, backend):
    from cli.app import main

    code = main(["serve", "--db", "postgresql://kdgate:hunter2@127.0.0.1:1/kdgate"])
    err = capsys.readouterr().err
    assert code == 2 and "127.0.0.1:1" in err and "hunter2" not in err and "Traceback" not in err
