"""Schemathesis against the live gateway's ``/openapi.json`` (issue 7): no 5xx, every 4xx in the envelope.

Every operation in the schema is exercised with a bounded number of generated cases (positive and
negative), with the admin key so that the admin endpoints get past authentication. The bigger run
(thousands of cases) is the schemathesis CLI against ``kdgate serve``; see ``SCHEMATHESIS_EXAMPLES`` below
for running this test with more examples.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
import pytest

from gateway.params import PROVIDER_OPTIONS
from tests.conftest import ADMIN_KEY

PROVIDER_OPTIONS_SORTED = sorted(PROVIDER_OPTIONS)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras: pip install 'kdgate[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

log = logging.getLogger(__name__)

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))


@pytest.fixture
def live(make_gateway):
    """A gateway with every admin endpoint, the dashboard's included (create_app installs them)."""
    return make_gateway(teacher_retries=0, teacher_timeout_s=5, allow_new_routes=True)


def _check(case: Any, resp: Any, problems: list[str]) -> None:
    where = f"{case.method} {case.formatted_path} {str(case.body)[:200]!r} query={case.query!r}"
    if resp.status_code >= 500:
        problems.append(f"{resp.status_code} for {where}: {resp.text[:300]}")
        return
    if 400 <= resp.status_code < 500:
        anthropic = case.formatted_path.startswith("/v1/messages")  # Anthropic's error shape there
        try:
            body = resp.json()
            err = body["error"]
            if anthropic:
                ok = body["type"] == "error" and isinstance(err, dict) and set(err) == {"type", "message"}
            else:
                ok = isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
        except Exception:
            ok = False
        if not ok:
            problems.append(f"{resp.status_code} without {'Anthropic' if anthropic else 'OpenAI'}'s envelope for {where}: {resp.text[:300]}")
        if not resp.headers.get("x-request-id"):
            problems.append(f"{resp.status_code} without x-request-id for {where}")


def test_every_operation_survives_generated_input(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    problems: list[str] = []
    operations = 0
    calls = [0]
    paths = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        paths.add(operation.path)
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case: Any) -> None:
            resp = case.call(base_url=live.url, headers=headers, timeout=30)
            calls[0] += 1
            _check(case, resp, problems)
            if isinstance(case.body, dict) and case.method.upper() == "POST" and case.formatted_path.startswith("/v1/"):
                # issue 18: the same body with a provider option in it is refused, never used
                option = PROVIDER_OPTIONS_SORTED[calls[0] % len(PROVIDER_OPTIONS_SORTED)]
                case.body = {**case.body, option: "http://127.0.0.1:9/steal"}
                resp = case.call(base_url=live.url, headers=headers, timeout=30)
                calls[0] += 1
                _check(case, resp, problems)
                if resp.status_code == 200:
                    problems.append(f"200 for a body with the provider option {option!r}: {case.formatted_path}")

        run()
    log.warning("schemathesis: %d operations, %d cases sent (at most %d each)", operations, calls[0], MAX_EXAMPLES)
    assert operations >= 8, f"only {operations} operations in /openapi.json"
    assert {"/v1/responses", "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens",
            "/v1/completions", "/v1/models/{model_id}"} <= paths, paths
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(sorted(set(problems))[:30])


def test_patch_limits_of_an_unknown_key_with_empty_body_is_404(live):
    resp = httpx.patch(live.url + "/admin/keys/key_nope", json={}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
