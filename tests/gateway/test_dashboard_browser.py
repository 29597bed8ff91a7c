"""The dashboard in real headless Chromium: log in, read the overview, move a route's threshold, save.

Traffic is seeded into the ledger directly (a replay of the banking77 fixture stream with a student
taking over part-way); with a student router installed (``state.students``), the last step also sends
requests and checks that they are routed by the saved threshold.

``KDGATE_SCREENSHOTS=1`` saves ``docs/screenshots/overview.png`` and ``docs/screenshots/route.png``.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY
from tests.gateway.test_dashboard_api import make_dash_gateway, seed_route  # noqa: F401  (fixture)
from tests.sql import sql_rows, sql_value

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
ROUTE = "banking77"
XSS = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">my card <b>never</b> arrived"
FIXTURE = Path(__file__).parents[1] / "fixtures" / "banking77_small.jsonl"
SCREENSHOTS = Path(__file__).parents[2] / "docs" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (make browsers: apt-get install chromium)"),
]


def _curve() -> list[dict[str, float]]:
    """A smooth validation curve: lower thresholds serve more and agree less."""
    points = []
    for i in range(41):
        t = round(1 - i / 40, 3)
        coverage = round(min(1.0, (1 - t) ** 0.6), 4)
        agreement = round(1.0 - 0.2 * coverage**3, 4)
        points.append({"threshold": t, "coverage": coverage, "agreement": agreement})
    return points


def replay_banking77(gw, route: str, *, days: int = 7, per_day: int = 240, seed: int = 77) -> None:
    """Write a week of the banking77 stream: the teacher alone at first, then a student serving more."""
    rng = random.Random(seed)
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    labels = sorted({i["answer"] for i in items})
    now = time.time() - 3600
    start = now - days * 86400
    rows, shadows = [], []
    for n in range(days * per_day):
        ts = start + n * (days * 86400) / (days * per_day) + rng.uniform(0, 60)
        item = items[n % len(items)]
        pt, ct = 80 + len(item["messages"][-1]["content"]) // 4, 3
        teacher_cost = pt * 0.15e-6 + ct * 0.6e-6
        progress = (ts - start) / (days * 86400)
        live = progress > 0.25
        conf = rng.betavariate(5, 1.5) if live else None
        student = live and conf >= 0.55
        latency = rng.lognormvariate(1.6, 0.3) if student else rng.lognormvariate(6.4, 0.35)
        uid = f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}"
        rows.append((uid, ts, route, "chat.completions", route, json.dumps({"messages": item["messages"]}), item["answer"],
                     200, "student" if student else "teacher", 2 if live else None, conf,
                     0.0 if student else teacher_cost, teacher_cost, latency, pt, ct))
        if student and rng.random() < 0.1:
            agree = rng.random() < 0.95
            shadows.append((ts, route, uid, 2, item["answer"], item["answer"] if agree else rng.choice(labels), int(agree),
                            teacher_cost))
    with gw.state.ledger.conn as conn:
        conn.executemany(
            "INSERT INTO exchanges (uid, ts, route, endpoint, model, request, answer, status, served_by, student_version,"
            " confidence, cost_usd, counterfactual_usd, latency_ms, prompt_tokens, completion_tokens)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO shadow_checks (ts, route, exchange_uid, student_version, student_answer, teacher_answer, agree, cost_usd)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            shadows,
        )


def screenshots_wanted() -> bool:
    """KDGATE_SCREENSHOTS=1, read from the environment the process started with: tests/conftest.py
    removes every KDGATE_* variable at import (the settings refuse unknown ones)."""
    if os.environ.get("KDGATE_SCREENSHOTS") == "1":
        return True
    try:
        initial = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"KDGATE_SCREENSHOTS=1" in initial


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_dashboard_end_to_end_in_chromium(make_dash_gateway, browser):  # noqa: F811
    gw = make_dash_gateway()
    seed_route(gw, ROUTE, prompts=["I lost my card yesterday", XSS, "What is the exchange rate for euros?"], curve=_curve())
    replay_banking77(gw, ROUTE)
    seed_route(gw, "sst2", curve=_curve())
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.patch(gw.url + f"/admin/routes/{ROUTE}", json={"mode": "cascade", "target_agreement": 0.97},
                       headers=headers).status_code == 200
    limited = httpx.post(gw.url + "/admin/keys", json={"name": "team-<b>a</b>", "rpm": 600, "budget_day_usd": 25},
                         headers=headers).json()
    shots = screenshots_wanted()

    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    requests_seen: list[str] = []
    page.on("request", lambda req: requests_seen.append(req.url))

    # log in: the key goes in a form, never a URL; the cookie is HttpOnly
    page.goto(gw.url + "/dashboard")
    page.fill("#key", ADMIN_KEY)
    page.click("#login")
    page.wait_for_selector("#overview-cards")
    cookie = next(c for c in page.context.cookies() if c["name"] == "kdgate_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""
    assert all(ADMIN_KEY not in url for url in requests_seen)

    # the overview shows the ledger's numbers
    ledger = gw.state.ledger
    sums = sql_rows(ledger, 
        "SELECT count(*) AS n, coalesce(sum(counterfactual_usd), 0) AS cf, coalesce(sum(cost_usd), 0) AS cost,"
        " sum(CASE WHEN status = 200 AND served_by = 'student' THEN 1 ELSE 0 END) AS student FROM exchanges"
    )[0]
    shadow_cost = sql_value(ledger, "SELECT coalesce(sum(cost_usd), 0) FROM shadow_checks")
    shown = lambda sel: float(page.get_attribute(sel, "data-value"))  # noqa: E731
    assert shown("#requests") == sums["n"]
    assert page.inner_text("#requests") == f"{sums['n']:,}"
    assert shown("#teacher-only") == pytest.approx(sums["cf"])
    assert shown("#actual") == pytest.approx(sums["cost"] + shadow_cost)
    assert shown("#saved-total") == pytest.approx(sums["cf"] - sums["cost"] - shadow_cost)
    assert page.inner_text("#student-share") == f"{100 * sums['student'] / sums['n']:.1f}%"
    assert page.locator("#spend-chart path[data-series='Actual spend']").count() == 1
    assert page.locator("#routes-table tbody tr").count() == 2
    # per-key limits are shown, names as text
    key_row = page.locator(f"#keys-table tr[data-key-id='{limited['id']}']")
    assert key_row.locator("td[data-key='name']").inner_text() == "team-<b>a</b>"
    assert key_row.locator("td[data-key='rpm']").inner_text() == "600"
    assert key_row.locator("td[data-key='tpm']").inner_text() == "unlimited"
    assert key_row.locator("td[data-key='budget_day_usd']").inner_text().startswith("$25")
    # sortable: by requests ascending puts the smaller route first
    page.click("#routes-table th[data-key='requests']")
    assert page.locator("#routes-table tbody tr").first.get_attribute("data-route") == "sst2"
    page.click("#routes-table th[data-key='requests']")
    assert page.locator("#routes-table tbody tr").first.get_attribute("data-route") == ROUTE
    if shots:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "overview.png"), full_page=True)

    from playwright.sync_api import expect

    # open the route's page from its row
    page.click(f"#routes-table tr[data-route='{ROUTE}'] a.route-link")
    page.wait_for_selector("#curve-chart")
    assert page.locator("#current-threshold-marker").count() == 1
    expect(page.locator("#preview-coverage")).to_have_attribute("data-value", re.compile(r"."))

    # a prompt with markup is shown as text and never runs
    assert page.evaluate("window.__pwned") is None
    prompts = page.locator("#exchanges-table td.prompt").all_inner_texts()
    assert XSS in prompts
    assert page.locator("#exchanges-table script, #exchanges-table img, #exchanges-table b").count() == 0

    # move the threshold: the expected coverage updates before saving
    from router.policy import expected_at

    curve = _curve()
    page.check("#kind-threshold")
    page.fill("#threshold-input", "0.7")
    want = expected_at(curve, 0.7)
    expect(page.locator("#preview-coverage")).to_have_attribute("data-value", str(want["coverage"]))
    assert page.inner_text("#preview-coverage") == f"{100 * want['coverage']:.1f}%"
    assert page.inner_text("#preview-agreement") == f"{100 * want['agreement']:.1f}%"
    assert page.locator("#new-threshold-marker").count() == 1
    assert gw.state.routes.get(ROUTE).settings.get("threshold") is None  # not saved yet
    page.fill("#threshold-input", "0.4")
    want = expected_at(curve, 0.4)
    expect(page.locator("#preview-coverage")).to_have_attribute("data-value", str(want["coverage"]))
    if shots:
        page.screenshot(path=str(SCREENSHOTS / "route.png"), full_page=False)
    page.click("#save-threshold")
    expect(page.locator("#save-status")).to_have_text(re.compile(r"^Saved"))

    # saved, recorded with who and when, in force from the next request
    shown_route = httpx.get(gw.url + f"/admin/routes/{ROUTE}", headers=headers).json()
    assert shown_route["settings"]["threshold"] == 0.4
    event = next(e for e in ledger.events(ROUTE) if e["kind"] == "settings")  # the newest settings change
    assert event["kind"] == "settings" and event["actor"] == "admin" and event["detail"] == {"threshold": 0.4}
    assert page.inner_text("#current-threshold") == "0.400"

    # the mode switch
    page.select_option("#mode-select", "shadow")
    page.click("#save-mode")
    expect(page.locator("#current-mode")).to_have_text("shadow")
    assert gw.state.routes.get(ROUTE).settings["mode"] == "shadow"
    page.select_option("#mode-select", "cascade")
    page.click("#save-mode")
    expect(page.locator("#current-mode")).to_have_text("cascade")

    # a real student, trained by the distiller on the route's logged teacher pairs, replaces the seeded
    # one; the next requests are routed by the threshold saved from the page
    _train_real_student(gw)
    _assert_routed_by_threshold(gw, 0.4)
    assert not console_errors, console_errors
    assert all(u.startswith(gw.url) for u in requests_seen), "the page fetched something from outside the gateway"


def _train_real_student(gw) -> None:
    from distiller.config import DistillerConfig
    from distiller.pipeline import distill_route

    # the distiller's gate reads the route's target: a modest one, so 200-odd pairs make a live student
    # (the routing below follows the threshold saved from the page, not the target)
    gw.state.routes.update_settings(ROUTE, {"target_agreement": 0.8}, actor="test")
    report = distill_route(gw.state.ledger, ROUTE, DistillerConfig(min_pairs=40, finetune="never"),
                           artifacts_root=Path(gw.settings.db).parent / "trained-artifacts")
    assert report.promoted, report
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = gw.state.students.live.get(ROUTE)
        if live is not None and live.version == report.version:
            return
        time.sleep(0.2)
    raise AssertionError(f"the gateway never loaded v{report.version}: {gw.state.students.load_errors}")


def _assert_routed_by_threshold(gw, threshold: float) -> None:
    """With a student router: each answer's served-by and confidence respect the saved threshold."""
    import openai

    client = openai.OpenAI(base_url=gw.base_url, api_key=ADMIN_KEY, max_retries=0)
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:20]]
    counts = {"student": 0, "teacher": 0}
    for item in items:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=item["messages"], extra_headers={"x-kdgate-route": ROUTE}
        )
        served = raw.headers["x-kdgate-served-by"]
        confidence = raw.headers.get("x-kdgate-confidence")
        counts[served] += 1
        if served == "student":
            assert confidence is not None and float(confidence) >= threshold
        else:
            assert confidence is not None and float(confidence) < threshold, raw.headers
    assert counts["student"] > 0, counts  # the student answers what clears the saved threshold
