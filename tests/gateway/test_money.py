"""Money is counted once: the dashboard's saving equals the sum over ledger rows, whenever the rollup runs.

A real gateway with a live student and every student answer shadow-checked: each check's teacher call
costs money, and that cost must appear exactly once in "actual spend" (issue 14 found it added both
to the exchange's row and to the check's row, and the dashboard summing both).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from bench.standin import ReplayTeacher, ServerThread, messages_key
from tests.conftest import ADMIN_KEY
from tests.sql import sql_rows, sql_value
from tests.gateway.test_router_e2e import _dataset, _train_and_wait_for_cascade

pytestmark = [pytest.mark.slow, pytest.mark.both_backends]


def _sums(db: str) -> dict[str, float]:
    """The money, computed from the ledger's rows directly (not through the store or the rollups)."""
    teacher = sql_value(db, "SELECT coalesce(sum(cost_usd), 0) FROM exchanges WHERE served_by = 'teacher'")
    student = sql_value(db, "SELECT coalesce(sum(cost_usd), 0) FROM exchanges WHERE served_by = 'student'")
    teacher_only = sql_value(db, "SELECT coalesce(sum(counterfactual_usd), 0) FROM exchanges")
    checks = sql_rows(db, "SELECT count(*) AS n, coalesce(sum(cost_usd), 0) AS cost, "
                          "sum(CASE WHEN cost_usd <= 0 THEN 1 ELSE 0 END) AS zero FROM shadow_checks "
                          "WHERE teacher_answer IS NOT NULL")[0]
    return {"teacher": float(teacher), "student": float(student), "teacher_only": float(teacher_only),
            "checks": int(checks["n"]), "check_cost": float(checks["cost"]), "free_checks": int(checks["zero"] or 0)}


def test_each_cost_is_counted_once_whatever_the_rollup_timing(tmp_path, db_url):
    from gateway.app import create_app
    from gateway.settings import load_settings

    data = _dataset()
    standin = ReplayTeacher({messages_key(m): a for m, a in data}, model="gpt-4o", labels=["fruit", "vehicle"])
    with ServerThread(standin) as teacher:
        settings = load_settings(
            db=db_url, artifacts_dir=str(tmp_path / "artifacts"), teacher="openai/gpt-4o", teacher_api_base=teacher.url + "/v1", auth=False,
            admin_key=ADMIN_KEY, embedded_distiller=False, student_price_per_1k_tokens=0.002,
            routes={"topics": {"aliases": ["topic-model"], "target_agreement": 0.85, "shadow_rate": 1.0}},
        )
        gateway = ServerThread(create_app(settings)).start()
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
            state = gateway.config.app.state.kdgate
            _train_and_wait_for_cascade(data, client, state, tmp_path)
            overview = lambda: httpx.get(gateway.url + "/admin/overview?since=all").json()["totals"]  # noqa: E731
            served = 0
            for i, (messages, _) in enumerate(data[100:160]):
                raw = client.chat.completions.with_raw_response.create(model="topic-model", messages=messages)
                served += raw.headers["x-kdgate-served-by"] == "student"
                if i % 20 == 0:
                    state.writer.flush(10)
                    overview()  # a rollup in the middle: rows rolled up before their checks land
            assert served >= 10
            deadline = time.monotonic() + 60
            while state.students._background and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not state.students._background, "shadow checks never finished"
            state.writer.flush(10)
            sums = _sums(settings.db)
            assert sums["checks"] >= served * 0.9 and sums["free_checks"] == 0 and sums["check_cost"] > 0
            totals = overview()
            expected_actual = sums["teacher"] + sums["student"] + sums["check_cost"]
            assert totals["actual_usd"] == pytest.approx(expected_actual, rel=1e-9, abs=1e-12)
            assert totals["teacher_only_usd"] == pytest.approx(sums["teacher_only"], rel=1e-9, abs=1e-12)
            assert totals["saved_usd"] == pytest.approx(sums["teacher_only"] - expected_actual, rel=1e-9, abs=1e-12)
            # a student answer's row holds what the answer cost (the student price), never its check's
            rows = sql_rows(settings.db, "SELECT e.cost_usd, e.prompt_tokens, e.completion_tokens FROM exchanges e "
                                         "JOIN shadow_checks s ON s.exchange_uid = e.uid WHERE e.served_by = 'student'")
            assert rows
            for cost, prompt, completion in (tuple(r.values()) for r in rows):
                assert cost == pytest.approx(0.002 * (prompt + completion) / 1000, rel=1e-6)
        finally:
            gateway.stop()
