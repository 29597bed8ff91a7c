"""Changes made by another process reach a running gateway within seconds (issue 14: `kdgate routes
create` and `kdgate routes set`, run against a running gateway's ledger, never reached it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.both_backends

KDGATE = str(Path(sys.executable).parent / "kdgate")


def _kdgate(db: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")}
    return subprocess.run([KDGATE, *args, "--db", db], capture_output=True, text=True, timeout=120, env=env)


def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_cli_route_changes_reach_a_running_gateway(make_gateway):
    gw = make_gateway()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    created = _kdgate(gw.settings.db, "routes", "create", "triage")
    assert created.returncode == 0, created.stderr
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    ok = _until(lambda: httpx.post(gw.base_url + "/chat/completions", json=chat,
                                   headers={**admin, "x-kdgate-route": "triage"}).status_code == 200)
    assert ok, "the new route never reached the gateway"
    changed = _kdgate(gw.settings.db, "routes", "set", "triage", "threshold=0.42", "mode=cascade")
    assert changed.returncode == 0, changed.stderr
    seen = _until(lambda: httpx.get(gw.url + "/admin/routes/triage", headers=admin).json()["settings"].get("threshold") == 0.42)
    assert seen, httpx.get(gw.url + "/admin/routes/triage", headers=admin).json()
    assert httpx.get(gw.url + "/admin/routes/triage", headers=admin).json()["settings"]["mode"] == "cascade"


def test_cli_key_changes_reach_a_running_gateway(make_gateway):
    gw = make_gateway()
    created = _kdgate(gw.settings.db, "keys", "create", "team", "--json")
    assert created.returncode == 0, created.stderr
    import json

    key = json.loads(created.stdout)["key"]
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.post(gw.base_url + "/chat/completions", json=chat, headers=auth).status_code == 200
    assert _kdgate(gw.settings.db, "keys", "revoke", "team").returncode == 0
    refused = _until(lambda: httpx.post(gw.base_url + "/chat/completions", json=chat, headers=auth).status_code == 401)
    assert refused, "a revoked key kept working"
