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



def test_a_student_that_degrades_mid_stream_stops_serving_before_the_window_falls_under_the_target(loop):
    """After 1,000 requests the student serves, the teacher changes its mind about a third of the
    traffic (8 of the 24 words): the student, as confident as before, is now wrong on a third of what
    it serves. Over any 1,000 consecutive requests (the replay's ``min_window_agreement``), the answers
    the gateway returns agree with the teacher at the target minus one point at least: the route loses
    its threshold (the version's checks fall under what its calibration promised, or under the
    target) or is paused (the window monitor) first. Checks at 20% of served answers."""
    data, standin, gateway, client, state, tmp_path = loop
    _train_and_wait_for_cascade(data, client, state, tmp_path)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.patch(gateway.url + "/admin/routes/topics", json={"shadow_rate": 0.2}, headers=admin).status_code == 200
    target, window, change_at = 0.85, 1000, 1000
    flipped = set(FRUITS[:4] + VEHICLES[:4])
    answers = dict(standin.answers)
    returned: list[bool] = []
    stopped_at = worst = None
    for i, (messages, _) in enumerate(itertools.islice(itertools.cycle(data), 3500)):
        if i == change_at:
            for m, a in data:
                if any(f" {w} " in f" {m[1]['content'].rstrip('.?')} " for w in flipped):
                    answers[messages_key(m)] = "vehicle" if a == "fruit" else "fruit"
            assert sum(answers[k] != a for k, a in standin.answers.items()) == 40
            standin.answers = dict(answers)
        headers, resp = _ask(client, messages)
        returned.append(resp.choices[0].message.content == answers[messages_key(messages)])
        if stopped_at is None:
            if len(returned) >= window:
                worst = min(worst or 1.0, sum(returned[-window:]) / window)
                assert worst >= target - 0.01, (
                    f"request {i}: returned answers agree {worst:.1%} over the last {window} and the route still "
                    f"serves: {state.students.describe('topics').get('certification')}")
            if state.students.describe("topics")["threshold_effective"] is None or \
                    state.routes.get("topics").settings["mode"] != "cascade":
                stopped_at = i
        elif i > stopped_at + 50:
            break
        time.sleep(0.005)  # the background checks keep pace, as at a real request rate
    assert stopped_at is not None and stopped_at > change_at, (stopped_at, state.students.describe("topics"))
    # once it stopped, what it returns is the teacher's (escalations), which teach the next version
    assert all(returned[stopped_at + 5:])
    assert state.writer.flush(10)
    kinds = [e["kind"] for e in state.ledger.events("topics")]
    assert "threshold.revoked" in kinds or "drift.paused" in kinds
    checks = sql_rows(state.ledger, "SELECT sample_prob, confidence FROM shadow_checks WHERE route = 'topics' "
                                    "AND sample_prob IS NOT NULL")
    assert checks and all(0 < c["sample_prob"] <= 1 and c["confidence"] is not None for c in checks)


def test_a_new_version_starts_from_the_labelled_requests_it_never_trained_on(loop):
    """A version trained, then 20 requests answered by the teacher in shadow mode, then the version
    promoted: it is scored on those 20 as it loads (the requests it trained on do not count), so
    its certification starts from them."""
    from distiller import registry

    data, standin, gateway, client, state, tmp_path = loop
    _train_and_wait_for_cascade(data, client, state, tmp_path)
    state.routes.update_settings("topics", {"mode": "shadow", "auto_cascade": False}, actor="test")
    report = distill_route(state.ledger, "topics", DistillerConfig(min_pairs=40, finetune="never", min_label_examples=2),
                           artifacts_root=tmp_path / "artifacts", promote=False)
    for messages, _ in data[100:120]:
        headers, _ = _ask(client, messages)
        assert headers["x-kdgate-served-by"] == "teacher"
    assert state.writer.flush(10)
    registry.promote(state.ledger, "topics", report.version, actor="test")
    deadline = time.monotonic() + 60
    cert: dict = {}
    while time.monotonic() < deadline:
        d = state.students.describe("topics")
        cert = d.get("certification") or {}
        if (d.get("student") or {}).get("version") == report.version and cert.get("labelled"):
            break
        time.sleep(0.2)
    assert cert.get("labelled") == 20, state.students.describe("topics")
