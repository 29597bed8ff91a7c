"""An extraction route through the real gateway: teacher first, then the embedded distiller (the
worker process ``kdgate serve`` starts, with ``distiller.lm_base_model`` set) finds the route is an
extraction route, distils a structured LM student from the logged pairs and promotes it; shadow ->
cascade; student answers (plain and streamed) are valid JSON; escalations below the threshold and
for an unfinished answer are logged.

The base model is the project's tiny random-init Llama (bench.tiny), fully fine-tuned: the real
packaged bases take minutes to train on this CPU, and the same decoder (FastLlama) serves both.
tests/distiller/test_lm_structured.py trains the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from bench.standin import ReplayTeacher, ServerThread, messages_key
from tests import extraction
from tests.conftest import ADMIN_KEY
from tests.sql import sql_rows

pytestmark = pytest.mark.slow

ROUTE = "travel"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """The demo path: the gateway with its embedded distiller (a niced worker process) and
    ``distiller.lm_base_model`` set; the worker finds an extraction route and trains its LM student."""
    from bench.tiny import build_tiny_model
    from gateway.app import create_app
    from gateway.settings import load_settings

    root = tmp_path_factory.mktemp("lm-structured-e2e")
    rows = extraction.pairs(400, seed=11)
    warm, later = rows[:260], rows[260:]
    base = build_tiny_model(root / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=96, layers=2, heads=4,
                            intermediate_size=256)
    standin = ReplayTeacher({messages_key(r["messages"]): r["answer"] for r in rows}, model="gpt-4o")
    teacher = ServerThread(standin).start()
    settings = load_settings(
        db=str(root / "ledger.db"), artifacts_dir=str(root / "artifacts"), teacher="openai/gpt-4o",
        teacher_api_base=teacher.url + "/v1", auth=False, admin_key=ADMIN_KEY, embedded_distiller=True,
        distiller={"lm_base_model": str(base), "lm_preset": "tiny-cpu", "min_pairs": 250, "poll_seconds": 1.0,
                   "lm_settings": {"structured": {"epochs": 40, "learning_rate": 3e-3, "extra_learning_rate": 1e-2,
                                                  "batch_size": 16}}},
        routes={ROUTE: {"aliases": ["travel-model"], "target_agreement": 0.9, "target_confidence": 0.5,
                        "shadow_rate": 0.0}},
    )
    gateway = ServerThread(create_app(settings)).start()
    try:  # stopping the gateway stops its distiller process, also when the route never reaches cascade
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
        state = gateway.config.app.state.kdgate
        for r in warm:  # shadow mode, no student yet: the teacher answers and every pair is logged
            raw = client.chat.completions.with_raw_response.create(model="travel-model", messages=r["messages"])
            assert raw.headers["x-kdgate-served-by"] == "teacher"
            assert raw.parse().choices[0].message.content == r["answer"]
        assert state.writer.flush(10)
        _wait_for_cascade(state)
        row = sql_rows(state.ledger, "SELECT * FROM students WHERE route = ? AND status = 'live'", (ROUTE,))[0]
        yield {"state": state, "client": client, "gateway": gateway, "student": row, "later": later, "standin": standin}
    finally:
        gateway.stop()
        teacher.stop()


def _wait_for_cascade(state) -> None:
    deadline = time.monotonic() + 300  # the worker trains the tiny base in about 20 s; a shared CPU is slower
    while time.monotonic() < deadline:
        if state.routes.get(ROUTE).settings.get("mode") == "cascade" and ROUTE in state.students.live:
            return
        time.sleep(0.2)
    raise AssertionError(f"no cascade: {state.routes.get(ROUTE).settings} {state.students.describe(ROUTE)}")


def _ask(client, messages, **kw):
    raw = client.chat.completions.with_raw_response.create(model="travel-model", messages=messages, **kw)
    return raw.headers, raw.parse()


def test_the_route_gets_a_structured_student_and_moves_to_cascade(loop):
    row, state = loop["student"], loop["state"]
    metrics = json.loads(row["metrics"])
    assert row["kind"] == "lm_structured", row
    assert metrics["agreement"] >= 0.9 and metrics["coverage_at_target"] > 0.3, metrics
    events = state.ledger.events(ROUTE)
    kinds = [e["kind"] for e in events]
    assert "mode.auto_cascade" in kinds and "distill.lm_kind" in kinds
    chosen = [e for e in events if e["kind"] == "distill.student_kind"]
    assert chosen and chosen[0]["detail"]["kind"] == "lm" and "city" in chosen[0]["detail"]["reason"], chosen
    assert state.students.live[ROUTE].kind == "lm_structured"
    assert state.students.live[ROUTE].agreement == "json"


@pytest.mark.parametrize("stream", [False, True])
def test_the_student_answers_valid_json_plain_and_streamed(loop, stream):
    client, state = loop["client"], loop["state"]
    _wait_for_cascade(state)
    served, agree = 0, 0
    for r in loop["later"][:40]:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                    model="travel-model", messages=r["messages"], stream=True, stream_options={"include_usage": True}) as raw:
                headers = raw.headers
                chunks = list(raw.parse())
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].usage is not None
        else:
            headers, resp = _ask(client, r["messages"])
            text = resp.choices[0].message.content
        obj = json.loads(text)  # every answer parses, whoever gave it
        assert isinstance(obj, dict) and obj.get("intent") in ("book_flight", "book_hotel", "rent_car")
        if headers["x-kdgate-served-by"] == "student":
            served += 1
            agree += obj == json.loads(r["answer"])
            assert float(headers["x-kdgate-confidence"]) >= state.students.describe(ROUTE)["threshold_effective"]
            assert headers["x-kdgate-student-version"] == str(loop["student"]["version"])
    assert served >= 20, served
    assert agree >= 0.85 * served
    assert state.writer.flush(10)
    rows = sql_rows(state.ledger, "SELECT stream FROM exchanges WHERE route = ? AND served_by = 'student'", (ROUTE,))
    assert any(int(r["stream"]) == int(stream) for r in rows)


def test_low_confidence_and_unfinished_answers_escalate_and_are_logged(loop, monkeypatch):
    client, state, gateway = loop["client"], loop["state"], loop["gateway"]
    _wait_for_cascade(state)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    later = loop["later"]
    # a threshold no answer reaches: every request escalates, with the student's answer on the row
    r = httpx.patch(gateway.url + f"/admin/routes/{ROUTE}", json={"threshold": 1.0}, headers=admin)
    assert r.status_code == 200
    try:
        headers, resp = _ask(client, later[50]["messages"])
        assert headers["x-kdgate-served-by"] == "teacher" and headers["x-kdgate-escalation"] == "below_threshold"
        assert resp.choices[0].message.content == later[50]["answer"]
        assert state.writer.flush(10)
        row = state.ledger.exchange(headers["x-request-id"])
        assert row["served_by"] == "teacher" and row["confidence"] is not None
        assert isinstance(json.loads(row["student_answer"]), dict)
    finally:
        httpx.patch(gateway.url + f"/admin/routes/{ROUTE}", json={"clear_threshold": True}, headers=admin)
    # an answer the student cannot finish within its step budget is never served, whatever the client asks
    import router.lm_decode

    monkeypatch.setattr(router.lm_decode, "max_steps_for", lambda schema, req: 0)
    for extra in ({}, {"X-KDGate-Escalate": "0"}):
        headers, resp = _ask(client, later[51]["messages"], extra_headers=extra)
        assert headers["x-kdgate-served-by"] == "teacher" and headers["x-kdgate-escalation"] == "student_error"
        assert resp.choices[0].message.content == later[51]["answer"]
        assert state.writer.flush(10)
        assert state.ledger.exchange(headers["x-request-id"])["served_by"] == "teacher"


def test_a_student_answer_saves_what_the_teacher_would_have_charged(loop):
    """A student answer's counterfactual prices the teacher's token counts for the whole request (the
    static instructions the student never reads included) and the answer; the student's own counts,
    of its tokenizer and of the stripped prompt, are its usage and never price the teacher."""
    client, state = loop["client"], loop["state"]
    _wait_for_cascade(state)
    served = sum(_ask(client, r["messages"])[0]["x-kdgate-served-by"] == "student" for r in loop["later"][100:140])
    assert served >= 20, served
    assert state.writer.flush(10)

    def mean(sql: str) -> float:
        return float(sql_rows(state.ledger, sql, (ROUTE,))[0]["v"])

    where = "FROM exchanges WHERE route = ? AND status = 200 AND served_by = "
    teacher_cost = mean(f"SELECT avg(cost_usd) AS v {where}'teacher'")
    teacher_prompt = mean(f"SELECT avg(prompt_tokens) AS v {where}'teacher'")
    student_cf = mean(f"SELECT avg(counterfactual_usd) AS v {where}'student'")
    student_prompt = mean(f"SELECT avg(prompt_tokens) AS v {where}'student'")
    assert student_prompt < 0.6 * teacher_prompt  # what the student read is much shorter than what the teacher did
    # requests drawn alike: a student answer would have cost what a teacher answer did
    assert 0.8 * teacher_cost < student_cf < 1.25 * teacher_cost, (student_cf, teacher_cost)
    rows = sql_rows(state.ledger, f"SELECT cost_usd, counterfactual_usd {where}'student'", (ROUTE,))
    assert all(r["cost_usd"] == 0.0 and r["counterfactual_usd"] > 0 for r in rows)
