"""Teacher faults (issue 7): every stand-in fault mode, streaming and not, checked end to end.

tests/gateway/test_errors.py already checks that 500/429/garbage/timeout map to their status for a
non-streaming call. Here each case also asserts the deadline (wall time), the retry behaviour
(how many calls reached the teacher), the headers passed on, the streaming path and the ledger row.
The client is the official ``openai`` SDK where the wire format matters, httpx where a raw view helps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.settings import Settings
from bench.standin import ReplayTeacher, ServerThread, free_port
from tests.conftest import echo_answer
from tests.sql import sql_rows

log = logging.getLogger(__name__)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "fault probe"}]}
TIMEOUT_S = 1.0


def _post(gw: Any, body: dict[str, Any], *, timeout: float = 30) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=timeout)


def _envelope(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in resp.text
    return err


def _last_row(gw: Any) -> dict[str, Any]:
    gw.flush()
    rows = sql_rows(gw.state.ledger, "SELECT * FROM exchanges ORDER BY id DESC LIMIT 1")
    assert rows, "no ledger row was written"
    return rows[0]


def _sse_events(text: str) -> list[Any]:
    """The data payloads of an SSE body, parsed where they are JSON."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        payload = block[6:]
        if payload == "[DONE]":
            out.append("[DONE]")
            continue
        try:
            out.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            out.append(payload)
    return out


@pytest.fixture
def teacher():
    """The conftest stand-in, stopped without waiting for handlers parked by the "timeout" fault.

    The stand-in's timeout fault sleeps for an hour; a graceful uvicorn stop would wait 30 s for it.
    """
    standin = ReplayTeacher(fallback=echo_answer, model="gpt-4o-mini", labels=["positive", "negative"])
    server = ServerThread(standin).start()
    yield standin, server
    server.server.force_exit = True
    server.stop(timeout=5)


def _no_breaker() -> dict[str, Any]:
    """Settings that keep the teacher's circuit breaker (where the gateway has one) out of a test."""
    return {"breaker_failures": 1000} if "breaker_failures" in Settings.model_fields else {}


@pytest.fixture
def gw(make_gateway):
    return make_gateway(auth=False, teacher_retries=2, teacher_timeout_s=TIMEOUT_S, retry_backoff_s=0.01)


# -- timeout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_timeout_answers_504_within_the_deadline(gw, teacher, stream):
    standin, _ = teacher
    standin.fault = "timeout"
    t0 = time.monotonic()
    resp = _post(gw, {**CHAT, "stream": stream}, timeout=TIMEOUT_S * 10)
    elapsed = time.monotonic() - t0
    standin.fault = None
    err = _envelope(resp, 504)
    assert err["type"] == "timeout" and err["code"] == "upstream_timeout"
    # the deadline covers the retries too: one deadline, not one per attempt
    assert elapsed < TIMEOUT_S + 1.0, f"answered after {elapsed:.2f}s with a {TIMEOUT_S}s deadline"
    assert standin.calls == 1, "a timed-out call must not be retried past the deadline"
    row = _last_row(gw)
    assert row["status"] == 504 and row["error"] and row["stream"] == int(stream)


def test_timeout_with_the_openai_client_raises_a_timeout_status(gw, teacher):
    standin, _ = teacher
    standin.fault = "timeout"
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=TIMEOUT_S * 10)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**CHAT)
    standin.fault = None
    assert info.value.status_code == 504 and time.monotonic() - t0 < TIMEOUT_S + 1.0


# -- refused ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_refused_connection_is_502_after_retries(make_gateway, stream):
    closed = free_port()  # nothing listens here
    gw = make_gateway(auth=False, teacher_api_base=f"http://127.0.0.1:{closed}/v1", teacher_retries=2, teacher_timeout_s=5)
    t0 = time.monotonic()
    resp = _post(gw, {**CHAT, "stream": stream})
    err = _envelope(resp, 502)
    assert err["type"] == "api_error" and err["code"] == "upstream_error"
    assert "reach" in err["message"].lower()
    assert time.monotonic() - t0 < 5
    row = _last_row(gw)
    assert row["status"] == 502 and row["error"] and row["served_by"] == "teacher"


# -- 500 / 503 / 429 -------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["500", "503"])
def test_persistent_5xx_is_retried_then_passed_on(gw, teacher, fault, stream):
    standin, _ = teacher
    standin.fault = fault
    resp = _post(gw, {**CHAT, "stream": stream})
    standin.fault = None
    err = _envelope(resp, int(fault))
    assert err["code"] == f"upstream_{fault}" and "stand-in fault" in err["message"]
    assert standin.calls == 3, "teacher_retries=2 means three calls in all"
    row = _last_row(gw)
    assert row["status"] == int(fault) and "stand-in fault" in row["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_persistent_429_passes_status_and_retry_after(gw, teacher, stream):
    standin, _ = teacher
    standin.fault = "429"
    t0 = time.monotonic()
    resp = _post(gw, {**CHAT, "stream": stream})
    standin.fault = None
    err = _envelope(resp, 429)
    assert err["type"] == "rate_limit_exceeded"
    assert resp.headers.get("retry-after") == "1"
    # retry-after: 1 is honoured between attempts unless that would pass the deadline (1 s here)
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    row = _last_row(gw)
    assert row["status"] == 429 and row["error"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["500", "503", "429"])
def test_transient_fault_recovers_with_a_correct_answer(make_gateway, teacher, fault, stream):
    gw = make_gateway(auth=False, teacher_retries=2, teacher_timeout_s=10, retry_backoff_s=0.01)
    standin, _ = teacher
    standin.fault, standin.fault_count = fault, 1
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=30)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**CHAT, stream=True) if c.choices)
    else:
        text = client.chat.completions.create(**CHAT).choices[0].message.content
    assert text == "echo: fault probe" and standin.calls == 2
    row = _last_row(gw)
    assert row["status"] == 200 and row["error"] is None and row["answer"] == "echo: fault probe"


# -- garbage ---------------------------------------------------------------------------------------
def test_garbage_is_502_and_logged(gw, teacher):
    standin, _ = teacher
    standin.fault = "garbage"
    resp = _post(gw, CHAT)
    standin.fault = None
    err = _envelope(resp, 502)
    assert "not valid JSON" in err["message"] and "<html>" not in err["message"]
    row = _last_row(gw)
    assert row["status"] == 502 and row["error"]


def test_garbage_stream_is_an_error_not_relayed(gw, teacher):
    standin, _ = teacher
    standin.fault = "garbage"
    resp = _post(gw, {**CHAT, "stream": True})
    standin.fault = None
    row = _last_row(gw)
    assert row["status"] == 502 and row["error"]
    assert "<html>" not in resp.text, "the teacher's garbage reached the client"
    if resp.status_code == 200:  # already streaming: the error must come in-band
        events = _sse_events(resp.text)
        assert events and isinstance(events[-1], dict) and "error" in events[-1]
    else:
        _envelope(resp, 502)


# -- a stream cut mid-way --------------------------------------------------------------------------
def test_cut_stream_ends_with_an_error_event_and_no_hang(gw, teacher):
    standin, _ = teacher
    standin.fault = "cut"
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "a long answer " * 20}]}
    t0 = time.monotonic()
    resp = _post(gw, body, timeout=TIMEOUT_S * 10)
    standin.fault = None
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    assert resp.status_code == 200  # the status line had gone before the cut
    events = _sse_events(resp.text)
    assert any(isinstance(e, dict) and e.get("choices") for e in events), "no content before the cut"
    last = events[-1]
    assert isinstance(last, dict) and set(last["error"]) == {"message", "type", "param", "code"}
    assert "[DONE]" not in events, "a cut stream must not look complete"
    row = _last_row(gw)
    assert row["status"] == 502 and row["error"] and row["stream"] == 1


def test_cut_stream_raises_in_the_openai_client(gw, teacher):
    standin, _ = teacher
    standin.fault = "cut"
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=TIMEOUT_S * 10)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model=CHAT["model"], stream=True, messages=[{"role": "user", "content": "x " * 30}]):
            pass
    standin.fault = None


def test_gateway_serves_normally_after_every_fault(make_gateway, teacher):
    """A fault leaves nothing behind: pooled connections, the writer and the next request are fine."""
    gw = make_gateway(auth=False, teacher_retries=2, teacher_timeout_s=TIMEOUT_S, retry_backoff_s=0.01, **_no_breaker())
    standin, _ = teacher
    for fault in ("timeout", "500", "503", "429", "garbage", "cut"):
        standin.fault = fault
        _post(gw, {**CHAT, "stream": fault == "cut"}, timeout=10)
    standin.fault = None
    resp = _post(gw, CHAT)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "echo: fault probe"
    gw.flush()
    statuses = [r["status"] for r in sql_rows(gw.state.ledger, "SELECT status FROM exchanges ORDER BY id")]
    assert statuses == [504, 500, 503, 429, 502, 502, 200]
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 200
