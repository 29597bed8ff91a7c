"""Hostile input (issue 7): bodies, headers, route names and keys an attacker or a broken client sends.

Every case must end in a correct answer or OpenAI's error envelope with a 4xx status: never a 500, a
traceback, a hang, an injected header, or a secret in a response, a log line or a ledger row.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.params import PROVIDER_OPTIONS
from gateway.settings import ROUTE_NAME_PATTERN
from bench.standin import ReplayTeacher, ServerThread
from tests.conftest import ADMIN_KEY, echo_answer
from tests.sql import sql_value

log = logging.getLogger(__name__)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
SQL_LIKE = ["x'; DROP TABLE exchanges;--", "1 OR 1=1", 'a" OR ""="', "route; DELETE FROM api_keys", "%' --"]
SCRIPT_LIKE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "javascript:alert(1)", "{{7*7}}${7*7}"]


def _post(gw: Any, body: bytes | str | dict, *, headers: dict | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    return httpx.post(gw.url + path, content=data, headers={"content-type": "application/json", **(headers or {})}, timeout=30)


def _envelope(resp: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return err


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def teacher():
    """The conftest stand-in, stopped without waiting for handlers parked by its "timeout" fault."""
    standin = ReplayTeacher(fallback=echo_answer, model="gpt-4o-mini", labels=["positive", "negative"])
    server = ServerThread(standin).start()
    yield standin, server
    server.server.force_exit = True
    server.stop(timeout=5)


@pytest.fixture
def gw(make_gateway):
    return make_gateway(auth=False, max_body_bytes=1024 * 1024, teacher_retries=0, teacher_timeout_s=5)


# -- size ----------------------------------------------------------------------------------------
def test_oversized_declared_body_is_413(gw):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    _envelope(_post(gw, big), 413)


def test_oversized_chunked_body_is_413_without_reading_it_all(gw):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(400):  # 400 x 8 KiB = 3.2 MiB, far past the 1 MiB limit
            yield b"x" * 8192
        yield b'"}]}'

    resp = httpx.post(gw.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    err = _envelope(resp, 413)
    assert err["code"] == "request_too_large"


def test_lying_content_length_is_refused(gw):
    """A Content-Length that is not a number is never trusted (h11 refuses it before the app)."""
    with socket.create_connection(("127.0.0.1", gw.server.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 99999999999999999999999\r\n\r\n{}")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 4"), head[:100]


# -- JSON shape ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [_nested(100_000), '{"a":' * 100_000, '{"model": "m", "messages": ' + _nested(5_000) + "}"])
def test_deeply_nested_json_is_400_not_a_recursion_error(gw, raw):
    err = _envelope(_post(gw, raw), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("depth", [300, 1000])
def test_nested_message_content_within_the_parse_limit_is_not_a_500(gw, depth):
    raw = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + _nested(depth) + "}]}"
    resp = _post(gw, raw)
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        _envelope(resp, 400)
    gw.flush()
    assert gw.state.ledger.count_exchanges() == 1, "the exchange was not logged"


def test_nesting_limit_is_64_levels(gw):
    from gateway.protocol import MAX_JSON_DEPTH

    ok = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + _nested(MAX_JSON_DEPTH - 4) + "}]}"
    assert _post(gw, ok).status_code == 200
    deep = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + _nested(200) + "}]}"
    _envelope(_post(gw, deep), 400)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "m\xc3", "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate escape
        b"\xef\xbb\xbf{}",  # BOM
        b"\x00\x00\x00{",
    ],
)
def test_invalid_utf8_body_is_400(gw, raw):
    _envelope(_post(gw, raw), 400)


@pytest.mark.parametrize("value", [b"\xff\xfe", b"caf\xc3\xa9", "r\u00e9sum\u00e9-\u2603".encode()])
def test_non_ascii_route_header_is_400(gw, value):
    err = _envelope(_post(gw, CHAT, headers={"x-kdgate-route": value}), 400)
    assert err["param"] == "route"


def test_invalid_utf8_authorization_is_401(make_gateway):
    gw = make_gateway()
    _envelope(_post(gw, CHAT, headers={"authorization": b"Bearer \xff\xfe\x80"}), 401)


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 10**6), ("n", 2**64), ("n", 10**40), ("n", 0), ("n", -1), ("n", 1.5), ("n", True), ("n", "2"),
        ("max_tokens", 10**7), ("max_tokens", 2**63), ("max_tokens", 10**40), ("max_tokens", 1e300), ("max_tokens", -5),
        ("max_completion_tokens", 10**30), ("top_logprobs", 10**9), ("temperature", 1e308),
    ],
)
def test_huge_or_wrong_numbers_are_400(gw, field, value):
    raw = json.dumps({**CHAT, field: value})
    err = _envelope(_post(gw, raw), 400)
    assert err["param"] == field


def test_max_n_is_answered(gw):
    resp = _post(gw, {**CHAT, "n": 128, "max_tokens": 1_000_000})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 128


# -- header injection ----------------------------------------------------------------------------
def _raw_request(port: int, header_line: bytes) -> bytes:
    body = json.dumps(CHAT).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           + header_line + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(req)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize(
    "line",
    [
        b"X-KDGate-Route: r1\rSet-Cookie: injected=1",
        b"X-KDGate-Route: r1\nSet-Cookie: injected=1",
        b"X-KDGate-Route: r1\x00Set-Cookie: injected=1",
    ],
)
def test_control_characters_in_route_header_are_refused(gw, line):
    out = _raw_request(gw.server.port, line)
    status_line = out.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), out[:200]
    assert b"injected=1" not in out.split(b"\r\n\r\n", 1)[0]


def test_split_header_injection_is_just_two_headers(gw):
    """CRLF inside a value becomes two headers on the wire; the route is then ``r1``, refused as unknown."""
    out = _raw_request(gw.server.port, b"X-KDGate-Route: r1\r\nSet-Cookie: injected=1")
    head = out.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 404") and b"injected" not in head


@pytest.mark.parametrize("value", ["a" * 129, "a" * 8000, "r:" + "x" * 10_000])
def test_overlong_route_header_is_400_or_431(gw, value):
    resp = _post(gw, CHAT, headers={"x-kdgate-route": value})
    assert resp.status_code in (400, 431), resp.status_code
    if resp.status_code == 400:
        _envelope(resp, 400)


@pytest.mark.parametrize("model", ["gpt\r\nSet-Cookie: a=b", "gpt\u2028\u0085x", "m" * 100_000, "<script>x</script>", SQL_LIKE[0]])
def test_hostile_model_names_never_reach_response_headers(gw, model):
    """Automatic routes derive their name from ``model``: the header that echoes it must stay clean."""
    resp = _post(gw, {**CHAT, "model": model})
    if resp.status_code != 200:  # a model no provider knows may be refused, in the envelope
        _envelope(resp, (400, 404))
    assert "set-cookie" not in resp.headers
    route = resp.headers.get("x-kdgate-route")
    assert route is None or re.fullmatch(ROUTE_NAME_PATTERN, route), route
    assert all("\r" not in v and "\n" not in v for v in resp.headers.values())


# -- SQL-like and script-like route names and prompts ----------------------------------------------
@pytest.mark.parametrize("name", SQL_LIKE + SCRIPT_LIKE)
@pytest.mark.parametrize("where", ["header", "metadata"])
def test_sql_and_script_route_names_are_400(make_gateway, name, where):
    gw = make_gateway(auth=False, allow_new_routes=True)
    if where == "header":
        resp = _post(gw, CHAT, headers={"x-kdgate-route": name})
    else:
        resp = _post(gw, {**CHAT, "metadata": {"route": name}})
    err = _envelope(resp, 400)
    assert err["param"] == "route" and name not in err["message"]
    assert sql_value(gw.state.ledger, "SELECT count(*) FROM sqlite_master WHERE name = 'exchanges'") == 1
    assert name not in [r["name"] for r in gw.state.ledger.routes()]


def test_sql_and_script_route_names_via_admin_api_are_400(make_gateway):
    gw = make_gateway()
    for name in SQL_LIKE + SCRIPT_LIKE:
        resp = httpx.post(gw.url + "/admin/routes", json={"name": name}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        _envelope(resp, 400)
        resp = httpx.get(gw.url + "/admin/routes/" + httpx.URL(name).path.lstrip("/"), headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert resp.status_code in (400, 404), resp.text


@pytest.mark.parametrize("stream", [False, True])
def test_sql_and_script_prompts_are_stored_verbatim_and_returned_as_data(gw, stream):
    prompts = SQL_LIKE + SCRIPT_LIKE + ["\u0000nul and \u202e bidi", "emoji \U0001f600 " * 50]
    uids = []
    for prompt in prompts:
        resp = _post(gw, {**CHAT, "stream": stream, "messages": [{"role": "user", "content": prompt}]})
        assert resp.status_code == 200
        uids.append(resp.headers["x-request-id"])
        if stream:
            assert resp.headers["content-type"].startswith("text/event-stream")
        else:
            # JSON, never HTML: a browser will not run the echoed script
            assert resp.headers["content-type"] == "application/json"
            assert resp.json()["choices"][0]["message"]["content"] == f"echo: {prompt}"
    gw.flush()
    assert sql_value(gw.state.ledger, "SELECT count(*) FROM sqlite_master WHERE name IN ('exchanges', 'api_keys', 'routes')") == 3
    for uid, prompt in zip(uids, prompts):
        row = gw.state.ledger.exchange(uid)
        assert row is not None and row["status"] == 200
        assert json.loads(row["request"])["messages"][0]["content"] == prompt
        assert row["answer"] == f"echo: {prompt}"


# -- the admin API and the dashboard refuse everyone but the admin --------------------------------
def _admin_get_paths(app_openapi: dict[str, Any]) -> list[str]:
    out = []
    for path, ops in app_openapi["paths"].items():
        if path.startswith("/admin") and "get" in ops:
            out.append(path.replace("{name}", "r1").replace("{key_id}", "key_x"))
    return out


def test_admin_api_refuses_gateway_missing_wrong_and_malformed_keys(make_gateway):
    gw = make_gateway()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    gw_key = httpx.post(gw.url + "/admin/keys", json={"name": "client"}, headers=admin).json()["key"]
    spec = httpx.get(gw.url + "/openapi.json").json()
    paths = _admin_get_paths(spec)
    assert "/admin/routes" in paths and "/admin/keys" in paths
    refused = {
        "gateway key": ({"authorization": f"Bearer {gw_key}"}, 403),
        "missing": ({}, 401),
        "wrong": ({"authorization": "Bearer " + "kdg-" + "z" * 43}, 401),
        "admin key, wrong scheme": ({"authorization": f"Basic {ADMIN_KEY}"}, 401),
        "admin key, no scheme": ({"authorization": ADMIN_KEY}, 401),
        "admin key prefix": ({"authorization": f"Bearer {ADMIN_KEY[:-1]}"}, 401),
        "empty bearer": ({"authorization": "Bearer"}, 401),
    }
    for path in paths:
        for what, (headers, status) in refused.items():
            resp = httpx.get(gw.url + path, headers=headers)
            _envelope(resp, status)
            assert ADMIN_KEY not in resp.text and gw_key not in resp.text, (path, what)
        assert httpx.get(gw.url + path, params={"key": ADMIN_KEY, "api_key": ADMIN_KEY}).status_code == 401
    for method, path, body in (("POST", "/admin/keys", {"name": "x"}), ("POST", "/admin/routes", {"name": "r9"}),
                               ("PATCH", "/admin/routes/r1", {"mode": "off"}), ("DELETE", "/admin/keys/key_x", None)):
        resp = httpx.request(method, gw.url + path, json=body, headers={"authorization": f"Bearer {gw_key}"})
        _envelope(resp, 403)
    assert [k["name"] for k in httpx.get(gw.url + "/admin/keys", headers=admin).json()] == ["client"]


@pytest.fixture
def dash_gw(make_gateway):
    """A gateway with the dashboard (create_app installs it)."""
    return make_gateway()


def test_dashboard_refuses_forged_cookies_and_keys(dash_gw):
    from gateway.dashboard import CSRF_HEADER, SESSION_COOKIE

    gw = dash_gw
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    gw_key = httpx.post(gw.url + "/admin/keys", json={"name": "client"}, headers=admin).json()["key"]
    forged = ["forged", "A" * 43, "", "' OR 1=1 --", ADMIN_KEY, gw_key, "x" * 5000]
    for value in forged:
        cookie = {"cookie": f"{SESSION_COOKIE}={value}"}
        page = httpx.get(gw.url + "/dashboard", headers=cookie)
        assert page.status_code == 200 and 'name="key"' in page.text, "a forged cookie got past the login form"
        assert ADMIN_KEY not in page.text and gw_key not in page.text
        _envelope(httpx.get(gw.url + "/admin/routes", headers=cookie), 401)
    # logging in with a gateway key or a wrong key gives no session
    for key, status in ((gw_key, 403), ("wrong", 401), ("", 401)):
        resp = httpx.post(gw.url + "/dashboard/login", data={"key": key}, headers={"origin": gw.url}, follow_redirects=False)
        assert resp.status_code == status and SESSION_COOKIE not in resp.headers.get("set-cookie", "")
    # a real session does not carry over to state-changing calls without its CSRF token
    login = httpx.post(gw.url + "/dashboard/login", data={"key": ADMIN_KEY}, headers={"origin": gw.url}, follow_redirects=False)
    assert login.status_code == 303
    sid = login.cookies.get(SESSION_COOKIE) or re.search(SESSION_COOKIE + r"=([^;]+)", login.headers["set-cookie"]).group(1)
    cookie = {"cookie": f"{SESSION_COOKIE}={sid}"}
    assert httpx.get(gw.url + "/admin/routes", headers=cookie).status_code == 200
    _envelope(httpx.post(gw.url + "/admin/keys", json={"name": "csrf"}, headers=cookie), 401)
    _envelope(httpx.post(gw.url + "/admin/keys", json={"name": "csrf"}, headers={**cookie, CSRF_HEADER: "forged"}), 401)
    # a tampered session id (one character changed) is a forged one
    tampered = sid[:-1] + ("A" if sid[-1] != "A" else "B")
    _envelope(httpx.get(gw.url + "/admin/routes", headers={"cookie": f"{SESSION_COOKIE}={tampered}"}), 401)


# -- secrets: nowhere in responses, logs or the ledger ---------------------------------------------
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot format still counts
            text = repr(record.__dict__)
        self.lines.append(text + " " + repr(record.args) + " " + repr(getattr(record, "__dict__", {})))


def _all_ledger_text(db: str) -> str:
    conn = sqlite3.connect(db)
    try:
        out = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                out.append(repr(row))
        return "\n".join(out)
    finally:
        conn.close()


@pytest.mark.parametrize("direct_http", [True, False], ids=["direct-http", "litellm"])
def test_no_secret_in_any_response_log_line_or_ledger_row(make_gateway, teacher, direct_http):
    standin, _ = teacher
    provider_key = "sk-provider-SECRET-" + "q" * 24
    handler = _Capture()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    seen: list[str] = []

    def record(resp: httpx.Response) -> None:
        seen.append(f"{resp.status_code} {dict(resp.headers)!r} {resp.text}")

    try:
        gw = make_gateway(teacher_api_key=provider_key, direct_http=direct_http, teacher_retries=1, teacher_timeout_s=2)
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        created = httpx.post(gw.url + "/admin/keys", json={"name": "client"}, headers=admin)
        gw_key = created.json()["key"]
        auth = {"authorization": f"Bearer {gw_key}"}
        record(httpx.get(gw.url + "/admin/keys", headers=admin))
        record(httpx.get(gw.url + "/admin/routes", headers=admin))
        record(httpx.get(gw.url + "/v1/models", headers=auth))
        for stream in (False, True):
            record(_post(gw, {**CHAT, "stream": stream}, headers=auth))
            for fault in ("500", "429", "garbage", "cut", "timeout"):
                standin.fault = fault
                record(_post(gw, {**CHAT, "stream": stream}, headers=auth))
            standin.fault = None
        for bad in ("{oops", json.dumps({**CHAT, "n": 10**9}), b"\xff\xfe"):
            record(_post(gw, bad, headers=auth))
        record(_post(gw, CHAT, headers={**auth, "x-kdgate-route": "<script>"}))
        for option in sorted(PROVIDER_OPTIONS):  # issue 18: provider options in a body, carrying the key
            resp = _post(gw, {**CHAT, option: provider_key}, headers=auth)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == option, (option, resp.text[:200])
            record(resp)
        record(_post(gw, CHAT, headers={"authorization": f"Bearer {gw_key}x"}))
        record(_post(gw, CHAT, headers={"authorization": f"Bearer {provider_key}"}))
        record(httpx.get(gw.url + "/admin/routes", headers=auth))
        record(_post(gw, {"model": "text-embedding-3-small", "input": "x"}, headers=auth, path="/v1/embeddings"))
        gw.flush()
        ledger = _all_ledger_text(gw.settings.db)
    finally:
        standin.fault = None
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert len(seen) >= 20 and any(s.startswith("200") for s in seen) and ledger
    logs = "\n".join(handler.lines)
    for name, secret in (("provider key", provider_key), ("gateway key", gw_key), ("admin key", ADMIN_KEY)):
        for where, text in (("a response", "\n".join(seen)), ("a log line", logs), ("the ledger", ledger)):
            assert secret not in text, f"the {name} appears in {where}"
    # the gateway key is shown once, at creation, and nowhere else
    assert gw_key in created.text
