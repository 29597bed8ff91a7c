"""The whole loop through real servers: teacher first, a student appears, cascade, escalation, drift.

The teacher is the stand-in replay server (answers from a synthetic label task); the student is a real
one trained by the distiller on the pairs the gateway logged.
"""

from __future__ import annotations

import itertools
import random
import time

import httpx
import openai
import pytest

from distiller.config import DistillerConfig
from distiller.pipeline import distill_route
from bench.standin import ReplayTeacher, ServerThread, messages_key
from tests.conftest import ADMIN_KEY
from tests.sql import sql_rows

pytestmark = [pytest.mark.slow, pytest.mark.both_backends]

FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "peach", "lemon", "kiwi", "melon", "apricot"]
VEHICLES = ["car", "truck", "bus", "bicycle", "motorbike", "tram", "van", "scooter", "train", "lorry", "taxi", "minivan"]
PATTERNS = ["I bought a {} at the market.", "The {} was lovely today.", "My neighbour's {} is bright red.", "Can you compare this {} with the other one?", "There is a {} near the door."]
SYSTEM = "Classify the topic of the user's message. Answer fruit or vehicle."


def _dataset(seed: int = 0) -> list[tuple[list[dict], str]]:
    rows = []
    for word, pattern in itertools.product(FRUITS + VEHICLES, PATTERNS):
        label = "fruit" if word in FRUITS else "vehicle"
        rows.append(([{"role": "system", "content": SYSTEM}, {"role": "user", "content": pattern.format(word)}], label))
    random.Random(seed).shuffle(rows)
    return rows


@pytest.fixture
def loop(tmp_path, db_url):
    data = _dataset()
    standin = ReplayTeacher({messages_key(m): a for m, a in data}, model="gpt-4o", labels=["fruit", "vehicle"])
    teacher = ServerThread(standin).start()
    from gateway.app import create_app
    from gateway.settings import load_settings

    settings = load_settings(
        db=db_url, artifacts_dir=str(tmp_path / "artifacts"), teacher="openai/gpt-4o", teacher_api_base=teacher.url + "/v1",
        auth=False, admin_key=ADMIN_KEY, embedded_distiller=False,
        routes={"topics": {"aliases": ["topic-model"], "target_agreement": 0.85}},
    )
    gateway = ServerThread(create_app(settings)).start()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
    state = gateway.config.app.state.kdgate
    yield data, standin, gateway, client, state, tmp_path
    gateway.stop()
    teacher.stop()


def _ask(client, messages, **kw):
    raw = client.chat.completions.with_raw_response.create(model="topic-model", messages=messages, **kw)
    return raw.headers, raw.parse()


def _train_and_wait_for_cascade(data, client, state, tmp_path, n_warm: int = 100) -> None:
    for messages, answer in data[:n_warm]:
        headers, resp = _ask(client, messages)
        assert headers["x-kdgate-served-by"] == "teacher" and resp.choices[0].message.content == answer
    assert state.writer.flush(10)
    report = distill_route(state.ledger, "topics", DistillerConfig(min_pairs=40, finetune="never", min_label_examples=2), artifacts_root=tmp_path / "artifacts")
    live = sql_rows(state.ledger, "SELECT version FROM students WHERE route = 'topics' AND status = 'live'")
    assert live, report
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        route = state.routes.get("topics")
        if route.settings.get("mode") == "cascade" and "topics" in state.students.live:
            return
        time.sleep(0.2)
    raise AssertionError(f"route never moved to cascade: {state.routes.get('topics').settings}, {state.students.describe('topics')}")


def test_student_takes_over_and_answers_in_openai_format(loop):
    data, standin, gateway, client, state, tmp_path = loop
    _train_and_wait_for_cascade(data, client, state, tmp_path)
    events = [e["kind"] for e in state.ledger.events("topics")]
    assert "mode.auto_cascade" in events
    served = {"student": 0, "teacher": 0}
    saved_from_headers = 0.0
    for messages, answer in data[100:]:
        headers, resp = _ask(client, messages)
        served[headers["x-kdgate-served-by"]] += 1
        assert resp.choices[0].message.content == answer
        assert resp.model == "topic-model"
        if headers["x-kdgate-served-by"] == "student":
            assert float(headers["x-kdgate-confidence"]) >= state.students.describe("topics")["threshold_effective"]
            assert headers["x-kdgate-student-version"] == "1"
            saved_from_headers += float(headers["x-kdgate-saved-usd"])
    assert served["student"] >= 0.8 * sum(served.values())
    # streaming from the student: OpenAI's chunks, usage when asked
    messages, answer = data[-1]
    with client.chat.completions.with_streaming_response.create(
        model="topic-model", messages=messages, stream=True, stream_options={"include_usage": True}, logprobs=True
    ) as raw:
        assert raw.headers["x-kdgate-served-by"] == "student"
        chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[1].choices[0].logprobs.content
    # savings add up exactly from the ledger rows (once background shadow checks are done)
    deadline = time.monotonic() + 10
    while state.students._background and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.writer.flush(10)
    rows = sql_rows(state.ledger, "SELECT cost_usd, counterfactual_usd, served_by FROM exchanges WHERE route = 'topics'")
    student_saved = sum(r["counterfactual_usd"] - r["cost_usd"] for r in rows if r["served_by"] == "student")
    assert student_saved > 0
    assert sum(r["counterfactual_usd"] - r["cost_usd"] for r in rows if r["served_by"] == "teacher") == 0
    # shadow checks (5% of student answers by default) also asked the teacher: their cost is on the
    # checks' own rows (issue 14: it was added to the exchange's row too, and counted twice)
    headers_saved = saved_from_headers + float(raw.headers["x-kdgate-saved-usd"])
    assert student_saved == pytest.approx(headers_saved, rel=1e-6)


def test_escalation_forced_and_low_confidence_and_broken_student(loop):
    data, standin, gateway, client, state, tmp_path = loop
    _train_and_wait_for_cascade(data, client, state, tmp_path)
    messages, answer = data[110]
    # a client forces the teacher for one call
    headers, resp = _ask(client, messages, extra_headers={"X-KDGate-Escalate": "1"})
    assert headers["x-kdgate-served-by"] == "teacher" and resp.choices[0].message.content == answer
    # a threshold no answer reaches escalates everything; escalations are logged as teacher pairs
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.patch(gateway.url + "/admin/routes/topics", json={"threshold": 1.0}, headers=admin)
    assert r.status_code == 200 and r.json()["settings"]["threshold"] == 1.0
    headers, resp = _ask(client, data[111][0])
    assert headers["x-kdgate-served-by"] == "teacher" and headers["x-kdgate-escalation"] == "below_threshold"
    assert state.writer.flush(10)
    row = state.ledger.exchange(headers["x-request-id"])
    assert row["served_by"] == "teacher" and row["confidence"] is not None and row["student_answer"] in ("fruit", "vehicle")
    # ... unless the client forbids escalation for that call
    headers, _ = _ask(client, data[112][0], extra_headers={"X-KDGate-Escalate": "0"})
    assert headers["x-kdgate-served-by"] == "student"
    # a student that cannot answer in time escalates; the client never sees an error
    r = httpx.patch(gateway.url + "/admin/routes/topics", json={"clear_threshold": True}, headers=admin)
    assert r.json()["settings"]["threshold"] is None
    state.settings.student_timeout_s = 1e-9
    headers, resp = _ask(client, data[113][0])
    assert headers["x-kdgate-served-by"] == "teacher" and headers["x-kdgate-escalation"] == "student_error"
    assert resp.choices[0].message.content == data[113][1]


def test_drift_pauses_the_route(loop):
    data, standin, gateway, client, state, tmp_path = loop
    _train_and_wait_for_cascade(data, client, state, tmp_path)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    httpx.patch(gateway.url + "/admin/routes/topics", json={"shadow_rate": 1.0}, headers=admin)
    # the teacher changes its mind: every answer flips
    flipped = {k: ("vehicle" if v == "fruit" else "fruit") for k, v in standin.answers.items()}
    standin.answers = flipped
    deadline = time.monotonic() + 60
    for messages, _ in itertools.cycle(data):
        _ask(client, messages)
        if state.routes.get("topics").settings["mode"] == "shadow" or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert state.routes.get("topics").settings["mode"] == "shadow"
    assert state.writer.flush(10)
    event = [e for e in state.ledger.events("topics") if e["kind"] == "drift.paused"][0]
    assert event["detail"]["live_agreement"] < 0.95
    checks = sql_rows(state.ledger, "SELECT count(*) AS n, sum(agree) AS agree FROM shadow_checks WHERE route = 'topics'")[0]
    assert checks["n"] >= 30 and checks["agree"] < checks["n"]


def test_a_new_version_lifts_a_drift_pause(loop):
    from distiller import registry

    data, standin, gateway, client, state, tmp_path = loop
    _train_and_wait_for_cascade(data, client, state, tmp_path)
    # the drift monitor paused the route (as in test_drift_pauses_the_route)
    state.routes.update_settings("topics", {"mode": "shadow", "paused_by_drift": True}, actor="drift-monitor")
    for messages, _ in data[100:]:  # more teacher pairs while paused
        _ask(client, messages)
    assert state.writer.flush(10)
    report = distill_route(state.ledger, "topics", DistillerConfig(min_pairs=40, finetune="never", min_label_examples=2),
                           artifacts_root=tmp_path / "artifacts", promote=False)
    registry.promote(state.ledger, "topics", report.version, actor="test")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and state.routes.get("topics").settings.get("mode") != "cascade":
        time.sleep(0.2)
    assert state.routes.get("topics").settings["mode"] == "cascade"
    assert state.routes.get("topics").settings["paused_by_drift"] is False
    kinds = [e["kind"] for e in state.ledger.events("topics")]
    assert "drift.cleared" in kinds
