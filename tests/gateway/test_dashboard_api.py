"""The dashboard's admin API and login sessions, against a real gateway on loopback."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from gateway.auth import create_key
from gateway.dashboard import CSRF_HEADER, SESSION_COOKIE
from tests.conftest import ADMIN_KEY, Gateway
from tests.sql import sql_exec, sql_rows, sql_value

pytestmark = pytest.mark.both_backends

ROUTE = "bank"
CURVE = [
    {"threshold": 0.9, "coverage": 0.2, "agreement": 1.0},
    {"threshold": 0.8, "coverage": 0.5, "agreement": 0.99},
    {"threshold": 0.6, "coverage": 0.7, "agreement": 0.97},
    {"threshold": 0.4, "coverage": 0.9, "agreement": 0.9},
    {"threshold": 0.1, "coverage": 1.0, "agreement": 0.8},
]


@pytest.fixture
def make_dash_gateway(make_gateway):
    """A gateway as create_app builds it: the dashboard, stats and /metrics are part of it."""
    return make_gateway


@pytest.fixture
def dash(make_dash_gateway) -> Gateway:
    gw = make_dash_gateway()
    seed_route(gw, ROUTE)
    return gw


def seed_route(
    gw: Gateway, route: str, *, now: float | None = None, prompts: list[str] | None = None,
    curve: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Create ``route`` with a live student (v2, a real artifact) and a candidate v3, plus traffic."""
    from router.artifact import write_manifest

    state = gw.state
    now = time.time() if now is None else now
    if state.routes.get(route) is None:
        state.routes.create(route, actor="test")
    ledger = state.ledger
    for version, status in ((1, "retired"), (2, "live"), (3, "candidate")):
        art = gw.settings.artifacts_path / f"artifacts-{route}-{version}"
        art.mkdir(parents=True, exist_ok=True)
        (art / "head.bin").write_bytes(b"weights %d" % version)
        checksum = write_manifest(art, {"kind": "label", "version": version})
        metrics = {"agreement": 0.9 + version / 100, "coverage_at_target": 0.5, "target_agreement": 0.97,
                   "threshold_at_target": 0.6, "ece": 0.03}
        with ledger.conn:
            ledger.conn.execute(
                "INSERT INTO students (route, version, kind, created, train_pairs, val_pairs, metrics, curve, calibration,"
                " artifact_path, checksum, status) VALUES (?, ?, 'label', ?, 100, 20, ?, ?, '{}', ?, ?, ?)",
                (route, version, now - 3600 * (4 - version), json.dumps(metrics), json.dumps(curve or CURVE), str(art), checksum, status),
            )
    prompts = prompts or ["my card was declined", "where is my transfer", "<script>window.__pwned = 1</script>hello"]
    rows = []
    for i in range(30):
        student = i % 3 != 0
        escalated = (not student) and i % 2 == 0
        teacher_cost = 0.00002 * (1 + i % 4)
        rows.append({
            "uid": f"chatcmpl-{uuid.uuid4().hex}", "ts": now - 60 * (30 - i), "route": route, "key_id": "",
            "endpoint": "chat.completions", "model": route, "teacher_model": "openai/gpt-4o-mini",
            "request": json.dumps({"messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}),
            "answer": "card_declined", "status": 200, "served_by": "student" if student else "teacher",
            "student_version": 2 if (student or escalated) else None,
            "confidence": (0.9 if student else 0.2) if (student or escalated) else None,
            "cost_usd": 0.0 if student else teacher_cost, "counterfactual_usd": teacher_cost,
            "latency_ms": 4.0 if student else 400.0 + i, "prompt_tokens": 20, "completion_tokens": 3, "stream": 0,
        })
    rows.append({**rows[0], "uid": f"chatcmpl-{uuid.uuid4().hex}", "status": 502, "served_by": "teacher", "cost_usd": 0.0,
                 "counterfactual_usd": 0.0, "confidence": None, "student_version": None, "answer": None})
    with ledger.conn:
        for row in rows:
            cols = list(row)
            ledger.conn.execute(f"INSERT INTO exchanges ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                [row[c] for c in cols])
        shadowed = [r for r in rows if r["served_by"] == "student"][:4]
        for j, r in enumerate(shadowed):
            ledger.conn.execute(
                "INSERT INTO shadow_checks (ts, route, exchange_uid, student_version, student_answer, teacher_answer, agree, cost_usd)"
                " VALUES (?, ?, ?, 2, ?, ?, ?, 0.00001)",
                (r["ts"], route, r["uid"], "card_declined", "card_declined" if j else "card_lost", int(j > 0)),
            )
    return {"rows": rows}


def admin(gw: Gateway) -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN_KEY}"}


def login(gw: Gateway) -> tuple[str, str]:
    """Log in with the form; returns (session id, csrf token)."""
    resp = httpx.post(gw.url + "/dashboard/login", data={"key": ADMIN_KEY}, follow_redirects=False)
    assert resp.status_code == 303, resp.text
    sid = resp.cookies.get(SESSION_COOKIE)
    page = httpx.get(gw.url + "/dashboard", headers={"cookie": f"{SESSION_COOKIE}={sid}"})
    marker = 'name="csrf-token" content="'
    csrf = page.text.split(marker, 1)[1].split('"', 1)[0]
    return sid, csrf


ENDPOINTS = [
    ("GET", "/admin/overview", None),
    ("GET", "/admin/routes-table", None),
    ("GET", f"/admin/routes/{ROUTE}/curve", None),
    ("GET", f"/admin/routes/{ROUTE}/preview?threshold=0.5", None),
    ("GET", f"/admin/routes/{ROUTE}/versions", None),
    ("GET", f"/admin/routes/{ROUTE}/exchanges?limit=5", None),
    ("POST", f"/admin/routes/{ROUTE}/promote/3", None),
    ("POST", f"/admin/routes/{ROUTE}/rollback/1", None),
    ("PATCH", f"/admin/routes/{ROUTE}", {"threshold": 0.5}),
]


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
def test_every_admin_endpoint_refuses_no_key_and_gateway_key(dash, method, path, body):
    resp = httpx.request(method, dash.url + path, json=body)
    assert resp.status_code == 401 and resp.json()["error"]["type"]
    _, key = create_key(dash.state.ledger, "app")
    resp = httpx.request(method, dash.url + path, json=body, headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 403
    resp = httpx.request(method, dash.url + path, json=body, headers={"authorization": "Bearer wrong-" + "b" * 30})
    assert resp.status_code == 401
    live = sql_rows(dash.state.ledger, "SELECT version FROM students WHERE route = ? AND status = 'live'", (ROUTE,))
    assert live == [{"version": 2}]  # nothing changed
    assert dash.state.routes.get(ROUTE).settings.get("threshold") is None


def test_login_sets_a_strict_http_only_secure_session_cookie(dash):
    page = httpx.get(dash.url + "/dashboard")
    assert page.status_code == 200 and 'name="key"' in page.text and "csrf-token" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    resp = httpx.post(dash.url + "/dashboard/login", data={"key": ADMIN_KEY}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/dashboard"
    cookie = resp.headers["set-cookie"]
    lowered = cookie.lower()
    assert "httponly" in lowered and "secure" in lowered and "samesite=strict" in lowered
    assert ADMIN_KEY not in cookie and ADMIN_KEY not in resp.headers["location"]
    sid = resp.cookies.get(SESSION_COOKIE)
    assert len(sid) >= 40
    shell = httpx.get(dash.url + "/dashboard", headers={"cookie": f"{SESSION_COOKIE}={sid}"})
    assert 'name="csrf-token"' in shell.text and ADMIN_KEY not in shell.text
    route_page = httpx.get(dash.url + f"/dashboard/routes/{ROUTE}", headers={"cookie": f"{SESSION_COOKIE}={sid}"})
    assert "/dashboard/static/app.js" in route_page.text


@pytest.mark.parametrize("key,status", [("wrong-" + "c" * 30, 401), ("", 401), ("gateway", 403)])
def test_login_refuses_wrong_keys(dash, key, status):
    if key == "gateway":
        _, key = create_key(dash.state.ledger, "app")
    resp = httpx.post(dash.url + "/dashboard/login", data={"key": key}, follow_redirects=False)
    assert resp.status_code == status
    assert "set-cookie" not in resp.headers
    assert 'id="login-error"' in resp.text and "<script" not in resp.text


def test_cross_site_login_is_refused(dash):
    resp = httpx.post(dash.url + "/dashboard/login", data={"key": ADMIN_KEY}, headers={"origin": "https://evil.example"},
                      follow_redirects=False)
    assert resp.status_code == 403 and "set-cookie" not in resp.headers


def test_forged_or_logged_out_session_gets_nothing(dash):
    forged = {"cookie": f"{SESSION_COOKIE}=" + "A" * 43}
    assert httpx.get(dash.url + "/admin/overview", headers=forged).status_code == 401
    assert 'name="key"' in httpx.get(dash.url + "/dashboard", headers=forged).text
    sid, csrf = login(dash)
    cookie = {"cookie": f"{SESSION_COOKIE}={sid}"}
    assert httpx.get(dash.url + "/admin/overview", headers=cookie).status_code == 200
    out = httpx.post(dash.url + "/dashboard/logout", headers={**cookie, CSRF_HEADER: csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert httpx.get(dash.url + "/admin/overview", headers=cookie).status_code == 401


def test_expired_session_is_refused(dash):
    sid, _ = login(dash)
    assert dash.server.config.app.state.sessions.get(sid) is not None
    sql_exec(dash.state.ledger, "UPDATE sessions SET expires = ?", (time.time() - 1,))  # sessions live in the store
    assert httpx.get(dash.url + "/admin/routes-table", headers={"cookie": f"{SESSION_COOKIE}={sid}"}).status_code == 401


def test_session_writes_need_the_csrf_header_and_are_recorded(dash):
    sid, csrf = login(dash)
    cookie = {"cookie": f"{SESSION_COOKIE}={sid}"}
    resp = httpx.patch(dash.url + f"/admin/routes/{ROUTE}", json={"threshold": 0.55}, headers=cookie)
    assert resp.status_code == 401
    resp = httpx.patch(dash.url + f"/admin/routes/{ROUTE}", json={"threshold": 0.55}, headers={**cookie, CSRF_HEADER: "x" * 43})
    assert resp.status_code == 401
    assert dash.state.routes.get(ROUTE).settings.get("threshold") is None
    resp = httpx.patch(dash.url + f"/admin/routes/{ROUTE}", json={"threshold": 0.55, "mode": "cascade"},
                       headers={**cookie, CSRF_HEADER: csrf})
    assert resp.status_code == 200 and resp.json()["settings"]["threshold"] == 0.55
    event = dash.state.ledger.events(ROUTE)[0]
    assert event["kind"] == "settings" and event["actor"] == "admin" and event["detail"]["threshold"] == 0.55
    assert event["ts"] == pytest.approx(time.time(), abs=60)


def test_threshold_and_mode_survive_a_restart(make_dash_gateway):
    gw = make_dash_gateway()
    seed_route(gw, ROUTE)
    resp = httpx.patch(gw.url + f"/admin/routes/{ROUTE}", json={"threshold": 0.61, "mode": "shadow"}, headers=admin(gw))
    assert resp.status_code == 200
    gw.server.stop()
    again = make_dash_gateway()
    shown = httpx.get(again.url + f"/admin/routes/{ROUTE}", headers=admin(again)).json()
    assert shown["settings"]["threshold"] == 0.61 and shown["settings"]["mode"] == "shadow"
    curve = httpx.get(again.url + f"/admin/routes/{ROUTE}/curve", headers=admin(again)).json()
    assert curve["effective_threshold"] == 0.61 and curve["mode"] == "shadow"


def test_overview_matches_the_ledger(dash):
    resp = httpx.get(dash.url + "/admin/overview?bucket=hour&since=24h", headers=admin(dash))
    assert resp.status_code == 200, resp.text
    ov = resp.json()
    sums = sql_rows(dash.state.ledger,
        "SELECT count(*) AS n, coalesce(sum(counterfactual_usd), 0) AS cf, coalesce(sum(cost_usd), 0) AS cost,"
        " sum(CASE WHEN status = 200 AND served_by = 'student' THEN 1 ELSE 0 END) AS student FROM exchanges"
    )[0]
    shadow_cost = sql_value(dash.state.ledger, "SELECT coalesce(sum(cost_usd), 0) FROM shadow_checks")
    t = ov["totals"]
    assert t["requests"] == sums["n"] == 31
    assert t["student"] == sums["student"] == 20
    assert t["teacher_only_usd"] == pytest.approx(sums["cf"])
    assert t["actual_usd"] == pytest.approx(sums["cost"] + shadow_cost)
    assert ov["saved"]["total"] == pytest.approx(sums["cf"] - sums["cost"] - shadow_cost)
    assert t["student_share"] == pytest.approx(20 / 31)
    assert sum(p["requests"] for p in ov["series"]) == 31
    assert all(p["t"] % 3600 == 0 for p in ov["series"])
    daily = httpx.get(dash.url + "/admin/overview?bucket=day&since=all", headers=admin(dash)).json()
    assert daily["range"]["requests"] == 31 and all(p["t"] % 86400 == 0 for p in daily["series"])
    bad = httpx.get(dash.url + "/admin/overview?since=yesterday-ish", headers=admin(dash))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    assert httpx.get(dash.url + "/admin/overview?bucket=week", headers=admin(dash)).status_code == 400


def test_routes_table_rows_and_sorting(dash):
    dash.state.routes.create("quiet", actor="test")
    rows = httpx.get(dash.url + "/admin/routes-table", headers=admin(dash)).json()
    by = {r["route"]: r for r in rows}
    bank = by[ROUTE]
    assert bank["requests"] == 31 and bank["student_share"] == pytest.approx(20 / 31)
    assert bank["escalation_rate"] == pytest.approx(5 / 25)  # 5 escalations among 25 requests the student saw first
    assert bank["validation_agreement"] == pytest.approx(0.92) and bank["live_version"] == 2
    assert bank["live_agreement"] == pytest.approx(3 / 4) and bank["shadow_checks"] == 4
    assert bank["student_p50_ms"] == pytest.approx(4.0, rel=0.1)
    assert 400 * 0.9 < bank["teacher_p50_ms"] < 430 * 1.1
    assert bank["mode"] is not None and bank["saved_usd"] > 0
    assert by["quiet"]["requests"] == 0 and by["quiet"]["live_version"] is None
    asc = httpx.get(dash.url + "/admin/routes-table?sort=requests&order=asc", headers=admin(dash)).json()
    assert [r["route"] for r in asc][:2] == ["quiet", ROUTE]
    bad = httpx.get(dash.url + "/admin/routes-table?sort=nope", headers=admin(dash))
    assert bad.status_code == 400


def test_curve_and_preview_follow_the_live_version(dash):
    from router.curve import threshold_for_target
    from router.policy import expected_at

    curve = httpx.get(dash.url + f"/admin/routes/{ROUTE}/curve", headers=admin(dash)).json()
    assert curve["version"] == 2 and [p["threshold"] for p in curve["curve"]] == [0.9, 0.8, 0.6, 0.4, 0.1]
    target = curve["target_agreement"]
    assert curve["effective_threshold"] == threshold_for_target(CURVE, target)
    p = httpx.get(dash.url + f"/admin/routes/{ROUTE}/preview?threshold=0.5", headers=admin(dash)).json()
    assert (p["coverage"], p["agreement"]) == (0.7, 0.97) == tuple(expected_at(CURVE, 0.5).values())
    p = httpx.get(dash.url + f"/admin/routes/{ROUTE}/preview?target_agreement=0.99", headers=admin(dash)).json()
    assert p["threshold"] == 0.8 and p["coverage"] == 0.5 and p["reachable"]
    p = httpx.get(dash.url + f"/admin/routes/{ROUTE}/preview?threshold=0.95", headers=admin(dash)).json()
    assert p["coverage"] == 0.0
    for q in ("", "?threshold=0.5&target_agreement=0.9", "?threshold=2"):
        assert httpx.get(dash.url + f"/admin/routes/{ROUTE}/preview{q}", headers=admin(dash)).status_code == 400
    assert httpx.get(dash.url + "/admin/routes/nope/curve", headers=admin(dash)).status_code == 404


def test_versions_promote_and_rollback(dash):
    versions = httpx.get(dash.url + f"/admin/routes/{ROUTE}/versions", headers=admin(dash)).json()
    assert [(v["version"], v["status"]) for v in versions] == [(3, "candidate"), (2, "live"), (1, "retired")]
    assert versions[1]["live_agreement"] == pytest.approx(0.75) and versions[1]["metrics"]["agreement"] == pytest.approx(0.92)
    resp = httpx.post(dash.url + f"/admin/routes/{ROUTE}/promote/3", headers=admin(dash))
    assert resp.status_code == 200 and resp.json() == {"route": ROUTE, "version": 3, "status": "live", "action": "promote"}
    resp = httpx.post(dash.url + f"/admin/routes/{ROUTE}/rollback/2", headers=admin(dash))
    assert resp.status_code == 200 and resp.json()["action"] == "rollback"
    statuses = dict((r["version"], r["status"]) for r in sql_rows(dash.state.ledger,
        "SELECT version, status FROM students WHERE route = ?", (ROUTE,)))
    assert statuses == {1: "retired", 2: "live", 3: "retired"}
    kinds = [(e["kind"], e["actor"], e["detail"]["version"]) for e in dash.state.ledger.events(ROUTE)[:2]]
    assert kinds == [("student.rollback", "admin", 2), ("student.promoted", "admin", 3)]
    missing = httpx.post(dash.url + f"/admin/routes/{ROUTE}/promote/9", headers=admin(dash))
    assert missing.status_code == 409 and "no student version 9" in missing.json()["error"]["message"]


def test_promotion_refuses_a_tampered_artifact(dash):
    art = dash.settings.artifacts_path / f"artifacts-{ROUTE}-3"
    art.parent.mkdir(parents=True, exist_ok=True)
    (art / "head.bin").write_bytes(b"tampered")
    resp = httpx.post(dash.url + f"/admin/routes/{ROUTE}/promote/3", headers=admin(dash))
    assert resp.status_code == 409
    assert sql_value(dash.state.ledger, "SELECT version FROM students WHERE route = ? AND status = 'live'", (ROUTE,)) == 2


def test_recent_exchanges_return_prompts_as_data_and_shadows_side_by_side(dash):
    rows = httpx.get(dash.url + f"/admin/routes/{ROUTE}/exchanges?limit=40", headers=admin(dash)).json()
    assert len(rows) == 31 and rows[0]["ts"] >= rows[-1]["ts"]
    assert any(r["prompt"] == "<script>window.__pwned = 1</script>hello" for r in rows)
    shadowed = [r for r in rows if r["shadow"]]
    assert len(shadowed) == 4 and {s["shadow"]["teacher_answer"] for s in shadowed} == {"card_declined", "card_lost"}
    assert httpx.get(dash.url + f"/admin/routes/{ROUTE}/exchanges?limit=0", headers=admin(dash)).status_code == 400


def test_openapi_documents_the_admin_endpoints(dash):
    schema = httpx.get(dash.url + "/openapi.json").json()
    paths = schema["paths"]
    for path in ("/admin/overview", "/admin/routes-table", "/admin/routes/{name}/curve", "/admin/routes/{name}/preview",
                 "/admin/routes/{name}/versions", "/admin/routes/{name}/promote/{version}",
                 "/admin/routes/{name}/rollback/{version}", "/admin/routes/{name}/exchanges", "/metrics"):
        assert path in paths, path
    assert "Overview" in schema["components"]["schemas"] and "RouteRow" in schema["components"]["schemas"]
    assert "/dashboard/login" not in paths


def test_static_assets_are_local_and_contained(dash):
    js = httpx.get(dash.url + "/dashboard/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text and "http://" not in js.text.replace("http://www.w3.org/2000/svg", "")
    assert httpx.get(dash.url + "/dashboard/static/app.css").status_code == 200
    for bad in ("../dashboard.py", "..%2Fdashboard.py", "index.html", ".hidden.js", "nope.js"):
        assert httpx.get(dash.url + "/dashboard/static/" + bad).status_code == 404, bad


def test_install_dashboard_is_idempotent(make_dash_gateway):
    from gateway.dashboard import install_dashboard

    gw = make_dash_gateway()
    app = gw.server.config.app
    before = len(app.routes)
    install_dashboard(app)
    assert len(app.routes) == before


def test_target_confidence_decides_how_a_thin_curve_is_read(make_dash_gateway):
    """30 and 100 validation pairs that agree 100% and 99% do not show 98% with 95% confidence:
    the route serves nothing until its admin accepts a weaker guarantee."""
    gw = make_dash_gateway()
    thin = [{"threshold": 0.95, "coverage": 0.3, "agreement": 1.0, "pairs": 30},
            {"threshold": 0.8, "coverage": 0.6, "agreement": 0.99, "pairs": 100},
            {"threshold": 0.5, "coverage": 0.9, "agreement": 0.95, "pairs": 300}]
    seed_route(gw, "thin", curve=thin)
    url = gw.url + "/admin/routes/thin"
    assert httpx.patch(url, json={"target_agreement": 0.98}, headers=admin(gw)).status_code == 200
    shown = httpx.get(url + "/curve", headers=admin(gw)).json()
    assert shown["effective_threshold"] is None and shown["target_confidence"] is None
    preview = httpx.get(url + "/preview?target_agreement=0.98", headers=admin(gw)).json()
    assert preview["reachable"] is False and preview["coverage"] == 0.0
    assert httpx.patch(url, json={"target_confidence": 0.5}, headers=admin(gw)).status_code == 200
    shown = httpx.get(url + "/curve", headers=admin(gw)).json()
    assert shown["effective_threshold"] == 0.8 and shown["target_confidence"] == 0.5
    assert shown["expected"] == {"coverage": 0.6, "agreement": 0.99}
    preview = httpx.get(url + "/preview?target_agreement=0.98", headers=admin(gw)).json()
    assert preview["reachable"] and preview["threshold"] == 0.8
    bad = httpx.patch(url, json={"target_confidence": 1.0}, headers=admin(gw))
    assert bad.status_code == 400 and bad.json()["error"]["param"] is not None
