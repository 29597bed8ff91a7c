"""Bad input and upstream failures: OpenAI's error envelope with the right status, logged as failures."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ADMIN_KEY
from tests.sql import sql_rows


def _post(gw, body: bytes | str, *, headers: dict | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
    data = body.encode() if isinstance(body, str) else body
    return httpx.post(gw.url + path, content=data, headers={"content-type": "application/json", **(headers or {})}, timeout=30)


def _assert_envelope(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return err


@pytest.fixture
def gw(make_gateway):
    return make_gateway(auth=False, max_body_bytes=2000, teacher_retries=1, teacher_timeout_s=2)


@pytest.mark.parametrize(
    "body,param",
    [
        ("{not json", None),
        ("[1, 2]", None),
        ('{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ('{"model": "m", "messages": []}', "messages"),
        ('{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
        ('{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        ('{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 100000}', "n"),
        ('{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    ],
)
def test_malformed_requests_get_400(gw, body, param):
    err = _assert_envelope(_post(gw, body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_body_over_limit_gets_413(gw):
    big = '{"model": "m", "messages": [{"role": "user", "content": "' + "x" * 5000 + '"}]}'
    _assert_envelope(_post(gw, big), 413)


def test_unknown_route_gets_404_and_bad_route_name_400(gw):
    ok = '{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    err = _assert_envelope(_post(gw, ok, headers={"x-kdgate-route": "no-such-route"}), 404)
    assert err["code"] == "route_not_found"
    _assert_envelope(_post(gw, ok, headers={"x-kdgate-route": "bad name; drop table"}), 400)


@pytest.mark.parametrize("fault,status", [("500", 500), ("429", 429), ("garbage", 502), ("timeout", 504)])
def test_upstream_failures_are_mapped_and_logged(gw, teacher, fault, status):
    standin, _ = teacher
    standin.fault = fault
    resp = _post(gw, '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}')
    _assert_envelope(resp, status)
    if status == 429:
        assert resp.headers.get("retry-after") == "1"
    standin.fault = None
    gw.flush()
    row = sql_rows(gw.state.ledger, "SELECT status, error FROM exchanges ORDER BY id DESC LIMIT 1")[0]
    assert row["status"] == status and row["error"]


def test_retry_recovers_from_one_transient_500(gw, teacher):
    standin, _ = teacher
    standin.fault, standin.fault_count = "500", 1
    resp = _post(gw, '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}')
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "echo: x"


def test_unknown_path_and_method_use_envelope(gw):
    _assert_envelope(httpx.get(gw.url + "/v1/nope"), 404)
    _assert_envelope(httpx.get(gw.url + "/v1/chat/completions"), 405)


def test_missing_key_401_and_admin_refuses_gateway_key(make_gateway):
    gw = make_gateway()
    _assert_envelope(_post(gw, '{"model": "m", "messages": [{"role": "user", "content": "x"}]}'), 401)
    created = httpx.post(gw.url + "/admin/keys", json={"name": "t"}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status_code == 201
    key = created.json()["key"]
    _assert_envelope(httpx.get(gw.url + "/admin/routes", headers={"authorization": f"Bearer {key}"}), 403)
    _assert_envelope(httpx.get(gw.url + "/admin/routes"), 401)
    listed = httpx.get(gw.url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert [k["name"] for k in listed] == ["t"] and "hash" not in listed[0] and "key" not in listed[0]
    revoke = httpx.delete(gw.url + f"/admin/keys/{created.json()['id']}", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert revoke.status_code == 200
    _assert_envelope(_post(gw, '{"model": "m", "messages": [{"role": "user", "content": "x"}]}', headers={"authorization": f"Bearer {key}"}), 401)


def test_provider_key_never_leaks(make_gateway, teacher, tmp_path):
    gw = make_gateway(auth=False)
    secret = gw.settings.teacher_api_key.get_secret_value()
    standin, _ = teacher
    texts = []
    for fault in (None, "500", "garbage"):
        standin.fault = fault
        texts.append(_post(gw, '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}').text)
    standin.fault = None
    gw.flush()
    assert not any(secret in t for t in texts)
    dump = "\n".join(str(r) for r in sql_rows(gw.state.ledger, "SELECT * FROM exchanges"))
    assert secret not in dump


def test_automatic_routes_are_bounded(make_gateway):
    gw = make_gateway(auth=False, max_auto_routes=3)
    names = set()
    for i in range(6):
        r = _post(gw, '{"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "task %d"}, {"role": "user", "content": "x"}]}' % i)
        assert r.status_code == 200
        names.add(r.headers["x-kdgate-route"])
    assert len(names) == 4 and "auto-overflow" in names
