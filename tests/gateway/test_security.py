"""Issue 18: what one holder of an ordinary gateway key could do, each tried against a real gateway.

The attacker's host is a capture server on another loopback port; the provider keys are canaries.
Each test reproduces a finding of the issue and fails on the code before it; each passes after.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth import create_key
from gateway.settings import SettingsError, load_settings
from bench.standin import ServerThread
from tests.conftest import ADMIN_KEY
from tests.standins.capture import CaptureServer
from tests.sql import sql_value

ANTHROPIC_CANARY = "sk-ant-canary-" + "c" * 24
OPENAI_CANARY = "sk-openai-canary-" + "o" * 24
PROVIDER_OPTIONS = ["base_url", "api_base", "api_key", "custom_llm_provider", "mock_response", "extra_body",
                    "extra_headers", "litellm_logging_obj", "aws_secret_access_key", "vertex_credentials"]


@pytest.fixture
def canaries(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_CANARY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)


@pytest.fixture
def attacker():
    capture = CaptureServer(answer="refund_request")
    with ServerThread(capture) as server:
        yield capture, server


def _key(gw: Any, name: str = "tenant", **limits: Any) -> str:
    _, key = create_key(gw.state.ledger, name)
    if limits:
        key_id = next(k["id"] for k in gw.state.ledger.keys() if k["name"] == name)
        gw.state.ledger.set_key_limits(key_id, limits)
        gw.state.keys.invalidate()
    return key


def _all_rows_text(gw: Any) -> str:
    gw.flush()
    with sqlite3.connect(gw.settings.db) as conn:
        return json.dumps([list(r) for r in conn.execute("SELECT * FROM exchanges")], default=str)


def _post(gw: Any, body: dict, key: str | None = None, **headers: str) -> httpx.Response:
    hdrs = {"content-type": "application/json", **headers}
    if key:
        hdrs["authorization"] = f"Bearer {key}"
    return httpx.post(gw.base_url + "/chat/completions", content=json.dumps(body), headers=hdrs, timeout=30)


# -- finding 1: client fields reach litellm as keyword arguments, with the operator's keys ---------
def test_a_client_cannot_send_the_provider_key_to_its_own_host(make_gateway, canaries, attacker):
    capture, server = attacker
    gw = make_gateway(teacher_api_key=None)
    key = _key(gw)
    client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    for model, extra in [
        ("anthropic/claude-3-haiku-20240307", {"base_url": server.url}),
        ("anthropic/claude-3-haiku-20240307", {"api_base": server.url}),
        ("gpt-4o-mini", {"base_url": server.url, "custom_llm_provider": "openai"}),
    ]:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], extra_body=extra)
        assert err.value.status_code in (400, 404), err.value
    assert capture.requests == []  # nothing, let alone a key, reached the attacker's host
    text = _all_rows_text(gw)
    assert ANTHROPIC_CANARY not in text and OPENAI_CANARY not in text


@pytest.mark.parametrize("option", PROVIDER_OPTIONS)
def test_provider_options_are_refused_on_the_litellm_path(make_gateway, canaries, attacker, option):
    """A configured Anthropic teacher (litellm's path): no provider option from a client is used."""
    capture, attacker_server = attacker
    provider = CaptureServer(answer="from the provider")
    with ServerThread(provider) as provider_server:
        gw = make_gateway(teacher_api_key=None, routes={"claude": {
            "teacher": "anthropic/claude-3-5-haiku-20241022", "teacher_api_base": provider_server.url, "aliases": ["claude-haiku"]}})
        key = _key(gw)
        value: Any = {"base_url": attacker_server.url} if option.startswith("extra_") else attacker_server.url
        if option == "mock_response":
            value = "refund_request"
        resp = _post(gw, {"model": "claude-haiku", "messages": [{"role": "user", "content": "hi"}], option: value}, key)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["code"] == "unsupported_parameter" and err["param"] == option
        assert capture.requests == [] and provider.requests == []
        # the same request without the option is answered by the configured provider, and only the
        # documented fields reach it (an unknown one is dropped and named in a header)
        ok = _post(gw, {"model": "claude-haiku", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                        "not_a_parameter": 1}, key)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == "from the provider"
        assert ok.headers["x-kdgate-ignored-params"] == "not_a_parameter"
        sent = provider.requests[-1]
        assert "not_a_parameter" not in sent.body.decode() and sent.headers.get("x-api-key") == ANTHROPIC_CANARY
        assert capture.requests == []


def test_mock_response_cannot_poison_a_route_for_free(make_gateway):
    gw = make_gateway()
    key = _key(gw)
    resp = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "my card was stolen"}],
                      "mock_response": "refund_request"}, key)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "mock_response"
    gw.flush()
    assert sql_value(gw.state.ledger, "SELECT count(*) FROM exchanges WHERE answer = 'refund_request'") == 0
    assert sql_value(gw.state.ledger, "SELECT count(*) FROM exchanges WHERE status = 200") == 0


def test_provider_options_never_reach_an_openai_compatible_teacher(make_gateway, teacher):
    """The direct-HTTP path: the upstream body is the allowlist too (a vLLM teacher would read
    `extra_body` or a LoRA name from it)."""
    gw = make_gateway()
    key = _key(gw)
    resp = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "extra_body": {"lora_name": "x"}}, key)
    assert resp.status_code == 400
    ok = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "guided_json": {"type": "object"}}, key)
    assert ok.status_code == 200 and ok.headers["x-kdgate-ignored-params"] == "guided_json"
    extra = make_gateway(teacher_extra_params=["guided_json"], db=str(Path(gw.settings.db).with_name("other.db")))
    ok = _post(extra, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "guided_json": {"type": "object"}},
               _key(extra))
    assert ok.status_code == 200 and "x-kdgate-ignored-params" not in ok.headers
    with pytest.raises(SettingsError, match="provider options"):
        load_settings(teacher_extra_params=["api_base"])


# -- finding 2: clients choose any teacher; unpriced models cost $0; budgets overshoot ---------------
def test_only_configured_teachers_can_be_named(make_gateway):
    gw = make_gateway()
    key = _key(gw, budget_day_usd=0.000001)
    client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    for model in ("openai/gpt-4.5-preview", "gpt-4o-mnii", "claude-3-5-sonnet-20240620"):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=128, max_tokens=1_000_000)
        assert err.value.body["code"] == "model_not_found"
    assert gw.state.routes.all() == []  # no route was created for an unknown model


def test_an_unpriced_teacher_is_refused_for_keys_with_a_budget(make_gateway, tmp_path):
    gw = make_gateway(teachers=["openai/kdgate-unpriced-model"])
    budgeted = _key(gw, "budgeted", budget_day_usd=1.0)
    free = _key(gw, "unlimited")
    body = {"model": "kdgate-unpriced-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    resp = _post(gw, body, budgeted)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_price_unknown"
    assert _post(gw, body, free).status_code == 200
    priced = make_gateway(teachers=["openai/kdgate-unpriced-model"], db=str(tmp_path / "priced.db"),
                          price_overrides={"kdgate-unpriced-model": {"input_per_token": 1e-6, "output_per_token": 2e-6}})
    _, key = create_key(priced.state.ledger, "budgeted")
    key_id = priced.state.ledger.keys()[0]["id"]
    priced.state.ledger.set_key_limits(key_id, {"budget_day_usd": 1.0})
    resp = _post(priced, body, key)
    assert resp.status_code == 200 and float(resp.headers["x-kdgate-cost-usd"]) > 0


def test_concurrent_requests_cannot_overshoot_a_budget(make_gateway, teacher):
    standin, _ = teacher
    standin.latency_s = 0.5
    standin.fallback = lambda body: " ".join(["word"] * 80)  # ~80 completion tokens: ~$4.8e-5 each
    gw = make_gateway()
    budget = 1.0e-4  # one request's maximum cost (~$6.1e-5 at max_tokens=100) fits, two do not
    key = _key(gw, budget_day_usd=budget)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
    results: list[int] = []

    def one() -> None:
        results.append(_post(gw, body, key).status_code)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(200) >= 1 and set(results) <= {200, 429}
    gw.flush()
    spent = sql_value(gw.state.ledger, "SELECT sum(cost_usd) FROM exchanges WHERE status = 200")
    assert spent <= budget, (spent, results)


def test_tpm_counts_list_content_and_reserves_max_tokens(make_gateway):
    gw = make_gateway()
    key = _key(gw, tpm=200)
    parts = [{"type": "text", "text": "word " * 200}]  # ~250 tokens in a content list
    resp = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": parts}]}, key)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limit_exceeded"
    resp = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, key)
    assert resp.status_code == 429  # 500 output tokens would pass the 200 per minute
    assert _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}, key).status_code == 200


# -- finding 3: memory grows without bound from template learning --------------------------------------
def test_template_learning_memory_is_bounded(make_gateway, teacher):
    standin, _ = teacher
    standin.fallback = lambda body: "ok"
    cap = 2 * 1024 * 1024
    gw = make_gateway(template_memory_bytes=cap)
    key = _key(gw)
    big = "x" * 1_000_000
    for i in range(12):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": f"new system prompt {i}"},
                                                     {"role": "user", "content": f"{i} {big}"}]}
        assert _post(gw, body, key).status_code == 200
    table = gw.state.routes
    held = sum(len(t) for ctx in table._contexts.values() for t, _ in ctx.pending)
    assert held <= cap and table.template_memory <= cap
    assert all(len(t) <= 8192 for ctx in table._contexts.values() for t, _ in ctx.pending)


def test_limits_are_checked_before_anything_is_learned(make_gateway, teacher):
    standin, _ = teacher
    gw = make_gateway()
    key = _key(gw, rpm=1)
    assert _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "first"}]}, key).status_code == 200
    routes, memory = len(gw.state.routes.all()), gw.state.routes.template_memory
    refused = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "another task"},
                                                              {"role": "user", "content": "y" * 100_000}]}, key)
    assert refused.status_code == 429
    assert len(gw.state.routes.all()) == routes and gw.state.routes.template_memory == memory
    # a request the teacher fails leaves nothing behind either
    other = _key(gw, "other")
    standin.fault, standin.fault_count = "garbage", 0
    failed = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "a third task"},
                                                             {"role": "user", "content": "z" * 100_000}]}, other)
    standin.fault = None
    assert failed.status_code == 502
    assert gw.state.routes.template_memory == memory


# -- finding 5: --no-auth accepts cross-site requests ---------------------------------------------------
def test_no_auth_refuses_other_sites_and_rebinding(make_gateway):
    gw = make_gateway(auth=False)
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    url = gw.base_url + "/chat/completions"
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        resp = httpx.post(url, content=chat, headers=headers)
        assert resp.status_code == 415, (headers, resp.text)
        assert resp.json()["error"]["code"] == "unsupported_media_type"
    rebinding = httpx.post(url, content=chat, headers={"content-type": "application/json", "host": "evil.example:8000"})
    assert rebinding.status_code == 403 and rebinding.json()["error"]["code"] == "host_not_allowed"
    read = httpx.get(gw.url + "/admin/routes", headers={"host": "attacker.example"})
    assert read.status_code == 403
    cross = httpx.post(url, content=chat, headers={"content-type": "application/json", "origin": "https://evil.example"})
    assert cross.status_code == 403
    promote = httpx.post(gw.url + "/admin/routes/r/promote/1")
    assert promote.status_code == 403 and promote.json()["error"]["code"] == "csrf_required"
    with_header = httpx.post(gw.url + "/admin/routes/r/promote/1", headers={"x-kdgate-csrf": "1"})
    assert with_header.status_code == 404  # past the guard: no such route
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]).choices
    assert httpx.get(gw.url + "/admin/routes", headers={"host": f"localhost:{gw.server.port}"}).status_code == 200


def test_with_auth_a_plain_text_body_is_refused_too(make_gateway):
    gw = make_gateway()
    key = _key(gw)
    resp = httpx.post(gw.base_url + "/chat/completions", headers={"authorization": f"Bearer {key}", "content-type": "text/plain"},
                      content=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}))
    assert resp.status_code == 415


# -- finding 6: the ledger queue is bounded in rows, not bytes --------------------------------------------
def test_the_ledger_queue_is_bounded_in_bytes(make_gateway, teacher):
    standin, _ = teacher
    cap = 8 * 1024 * 1024
    gw = make_gateway(ledger_max_queue_bytes=cap)
    key = _key(gw)
    locker = sqlite3.connect(gw.settings.db, timeout=30, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the disk is "gone": rows wait in the queue
    try:
        content = "p" * 1_000_000  # a row holds request, response and answer: ~3 MB
        for _ in range(6):
            assert _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}, key).status_code == 200
        writer = gw.state.writer
        assert writer.queued_bytes <= cap
        assert writer.dropped >= 3
        ready = httpx.get(gw.url + "/readyz").json()
        assert ready["checks"]["ledger_queue_bytes"] <= cap
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    gw.flush()
    assert gw.state.writer.queued_bytes == 0


# -- finding 7: no isolation between keys -------------------------------------------------------------------
def test_keys_can_be_scoped_to_routes_and_routes_to_keys(make_gateway):
    gw = make_gateway(routes={"alpha": {"aliases": ["alpha-model"]}, "beta": {"aliases": ["beta-model"]}})
    scoped = _key(gw, "scoped", routes=["alpha"])
    other = _key(gw, "other")
    msg = [{"role": "user", "content": "x"}]
    assert _post(gw, {"model": "alpha-model", "messages": msg}, scoped).status_code == 200
    for body, headers in (({"model": "beta-model", "messages": msg}, {}),
                          ({"model": "gpt-4o-mini", "messages": msg}, {"x-kdgate-route": "beta"}),
                          ({"model": "gpt-4o-mini", "messages": msg, "metadata": {"route": "beta"}}, {})):
        resp = _post(gw, body, scoped, **headers)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "route_not_allowed", resp.text
    assert _post(gw, {"model": "beta-model", "messages": msg}, other).status_code == 200
    admin = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    resp = httpx.patch(gw.url + "/admin/routes/beta", headers=admin,
                       json={"allowed_keys": ["scoped"], "train_on_allowed_keys_only": True})
    assert resp.status_code == 200, resp.text
    assert _post(gw, {"model": "beta-model", "messages": msg}, other).status_code == 403
    # beta is now trained only on its allowed keys' traffic, not on what "other" sent before
    scoped_id = next(k["id"] for k in gw.state.ledger.keys() if k["name"] == "scoped")
    httpx.patch(gw.url + f"/admin/keys/{scoped_id}", headers=admin, json={"routes": ["alpha", "beta"]}).raise_for_status()
    assert _post(gw, {"model": "beta-model", "messages": [{"role": "user", "content": "mine"}]}, scoped).status_code == 200
    gw.flush()
    pairs = list(gw.state.ledger.teacher_pairs("beta"))
    assert [p.messages[-1]["content"] for p in pairs] == ["mine"]


def test_automatic_routes_can_be_kept_apart_per_key(make_gateway):
    gw = make_gateway(auto_routes_per_key=True)
    a, b = _key(gw, "a"), _key(gw, "b")
    msg = [{"role": "system", "content": "Summarise the ticket."}, {"role": "user", "content": "printer on fire"}]
    ra = _post(gw, {"model": "gpt-4o-mini", "messages": msg}, a).headers["x-kdgate-route"]
    rb = _post(gw, {"model": "gpt-4o-mini", "messages": msg}, b).headers["x-kdgate-route"]
    assert ra != rb


# -- finding 8: the low ones ------------------------------------------------------------------------------
def test_readyz_and_metrics_can_be_closed_and_never_show_credentials(make_gateway, teacher):
    _, tserver = teacher
    base = tserver.url.replace("http://", "http://user:hunter2secret@") + "/v1"
    gw = make_gateway(teacher_api_base=base)
    key = _key(gw)
    assert _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}, key).status_code == 200
    text = httpx.get(gw.url + "/readyz").text
    assert "hunter2secret" not in text and "user:" not in text and "127.0.0.1" in text
    closed = make_gateway(ops_auth=True, db=str(Path(gw.settings.db).with_name("closed.db")))
    assert httpx.get(closed.url + "/metrics").status_code == 401
    assert httpx.get(closed.url + "/readyz").status_code == 401
    assert httpx.get(closed.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert httpx.get(closed.url + "/healthz").status_code == 200


def test_ledger_and_artifacts_are_private(tmp_path):
    from store import Ledger
    from router.artifact import artifact_dir, new_artifact_dir

    ledger = Ledger(tmp_path / "sub" / "ledger.db")
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    root = tmp_path / "artifacts"
    dirs = {artifact_dir(root, name, 1) for name in ("triage", "triage.", "triage:", "triage_")}
    assert len(dirs) == 4
    for hostile in ("/x", "../../etc", "..", "a/../../b"):
        d = new_artifact_dir(root, hostile, 1)
        assert d.resolve().is_relative_to(root.resolve())
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_route_names_are_matched_whole(make_gateway):
    gw = make_gateway(allow_new_routes=True)
    key = _key(gw)
    resp = _post(gw, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "metadata": {"route": "triage\n"}}, key)
    assert resp.status_code == 400
    with pytest.raises(SettingsError):
        load_settings(routes={"bad\n": {}})


def test_cli_rename_validates_and_output_escapes_control_characters(tmp_path, capsys):
    from cli.app import main
    from store import Ledger

    db = str(tmp_path / "ledger.db")
    assert main(["routes", "create", "triage", "--db", db]) == 0
    assert main(["routes", "rename", "triage", "/x", "--db", db]) == 2
    assert main(["routes", "rename", "triage", "ok\n", "--db", db]) == 2
    ledger = Ledger(db)
    ledger.add_key("key_evil", "\x1b[31mred\x1b]0;title\x07", "h" * 64)
    capsys.readouterr()
    assert main(["keys", "list", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31mred" in out
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z", out) and "e+09" not in out  # ISO times


def test_dashboard_login_is_throttled(make_gateway):
    gw = make_gateway(login_attempts_per_minute=3)
    origin = {"origin": gw.url, "content-type": "application/x-www-form-urlencoded"}
    statuses = [httpx.post(gw.url + "/dashboard/login", content="key=wrong-key", headers=origin).status_code for _ in range(4)]
    assert statuses[:3] == [401, 401, 401] and statuses[3] == 429
    right = httpx.post(gw.url + "/dashboard/login", content=f"key={ADMIN_KEY}", headers=origin)
    assert right.status_code == 429 and int(right.headers["retry-after"]) >= 1


def test_the_admin_key_must_be_long_enough():
    with pytest.raises(SettingsError, match="at least 16"):
        load_settings(admin_key="short-key")
    assert load_settings(admin_key="k" * 16).admin_key is not None


# -- finding 4: a quadratic scrub pattern on the serving path froze the event loop -------------------------
@pytest.mark.slow
def test_scrubbing_on_the_serving_path_cannot_stall_the_gateway(tmp_path):
    from gateway.app import create_app
    from bench.standin import ReplayTeacher, messages_key
    from tests.gateway.test_router_e2e import SYSTEM, _dataset, _train_and_wait_for_cascade

    data = _dataset()
    standin = ReplayTeacher({messages_key(m): a for m, a in data}, fallback=lambda body: "fruit", model="gpt-4o",
                            labels=["fruit", "vehicle"])
    with ServerThread(standin) as teacher:
        settings = load_settings(
            db=str(tmp_path / "ledger.db"), teacher="openai/gpt-4o", teacher_api_base=teacher.url + "/v1", auth=False,
            admin_key=ADMIN_KEY, embedded_distiller=False,
            routes={"topics": {"aliases": ["topic-model"], "target_agreement": 0.85, "pii_scrub": True}},
        )
        gateway = ServerThread(create_app(settings)).start()
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
            state = gateway.config.app.state.kdgate
            _train_and_wait_for_cascade(data, client, state, tmp_path)
            assert state.students.live["topics"].student.model.pii_scrub
            hostile = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a." * 20000}]
            done: list[Any] = []
            worker = threading.Thread(target=lambda: done.append(client.chat.completions.with_raw_response.create(
                model="topic-model", messages=hostile)))
            worker.start()
            slowest = 0.0
            while worker.is_alive():
                t0 = time.perf_counter()
                httpx.get(gateway.url + "/healthz", timeout=30)
                slowest = max(slowest, time.perf_counter() - t0)
            worker.join()
            assert done and done[0].http_response.status_code == 200
            assert slowest < 2.0, f"the event loop stalled {slowest:.2f}s on one request's scrubbing"
        finally:
            gateway.stop()
