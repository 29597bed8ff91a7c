"""Prometheus metrics: a registry per app, fed by the serving path, scraped at GET /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.money import Usage
from gateway.metrics import Metrics
from tests.gateway.test_dashboard_api import make_dash_gateway  # noqa: F401  (fixture)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_observations_are_counted_in_the_apps_own_registry():
    depth = [7]
    m = Metrics(queue_depth=lambda: depth[0])
    other = Metrics()
    m.observe_exchange("bank", "student", 0.004, 0.0, 0.002, Usage(prompt_tokens=30, completion_tokens=2))
    m.observe_exchange("bank", "teacher", 0.8, 0.002, 0.002, Usage(prompt_tokens=30, completion_tokens=2))
    m.observe_escalation("bank")
    m.observe_error("bank", 502)
    m.observe_overhead(0.0007)
    m.observe_distiller_run("bank", 42.0, True)
    m.observe_distiller_run("bank", 3.0, False)
    text = m.render().decode()
    assert value(text, "kdgate_requests_total", route="bank", served_by="student") == 1
    assert value(text, "kdgate_requests_total", route="bank", served_by="teacher") == 1
    assert value(text, "kdgate_escalations_total", route="bank") == 1
    assert value(text, "kdgate_errors_total", route="bank", status="502") == 1
    assert value(text, "kdgate_tokens_total", route="bank", kind="prompt") == 60
    assert value(text, "kdgate_tokens_total", route="bank", kind="completion") == 4
    assert value(text, "kdgate_cost_usd_total", route="bank", served_by="teacher") == pytest.approx(0.002)
    assert value(text, "kdgate_teacher_only_cost_usd_total", route="bank") == pytest.approx(0.004)
    assert value(text, "kdgate_savings_usd_total", route="bank") == pytest.approx(0.002)
    assert value(text, "kdgate_answer_latency_seconds_count", route="bank", served_by="student") == 1
    assert value(text, "kdgate_answer_latency_seconds_bucket", route="bank", served_by="student", le="0.005") == 1
    assert value(text, "kdgate_answer_latency_seconds_bucket", route="bank", served_by="teacher", le="0.5") == 0
    assert value(text, "kdgate_gateway_overhead_seconds_bucket", le="0.001") == 1
    assert value(text, "kdgate_distiller_runs_total", route="bank", outcome="ok") == 1
    assert value(text, "kdgate_distiller_runs_total", route="bank", outcome="failed") == 1
    assert value(text, "kdgate_distiller_run_seconds_sum", route="bank") == pytest.approx(45.0)
    assert value(text, "kdgate_ledger_queue_depth") == 7
    depth[0] = 3
    assert value(m.render().decode(), "kdgate_ledger_queue_depth") == 3
    assert "bank" not in other.render().decode()  # registries are separate


def test_queue_depth_survives_a_broken_callback():
    def broken() -> float:
        raise RuntimeError("writer gone")

    assert value(Metrics(queue_depth=broken).render().decode(), "kdgate_ledger_queue_depth") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_metrics_endpoint_counts_real_traffic(make_dash_gateway, stream):  # noqa: F811
    gw = make_dash_gateway(auth=False)
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
        ) as raw:
            route = raw.headers["x-kdgate-route"]
            list(raw.parse())
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        route = raw.headers["x-kdgate-route"]
    resp = httpx.get(gw.url + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert value(text, "kdgate_requests_total", route=route, served_by="teacher") == 1
    assert value(text, "kdgate_tokens_total", route=route, kind="completion") > 0
    assert value(text, "kdgate_cost_usd_total", route=route, served_by="teacher") > 0
    assert value(text, "kdgate_answer_latency_seconds_count", route=route, served_by="teacher") == 1
    assert ("kdgate_ledger_queue_depth", ()) in samples(text)
    bad = client.chat.completions.with_raw_response  # an unknown explicit route is a counted error
    with pytest.raises(openai.NotFoundError):
        bad.create(model="gpt-4o-mini", messages=messages, extra_headers={"x-kdgate-route": "no-such-route"})
    text = httpx.get(gw.url + "/metrics").text
    assert value(text, "kdgate_errors_total", route="(unrouted)", status="404") == 1


def test_distiller_runs_recorded_in_the_ledger_reach_the_metrics(make_dash_gateway):  # noqa: F811
    gw = make_dash_gateway(auth=False)
    ledger = gw.state.ledger
    tail = gw.server.config.app.state.distiller_runs  # the gateway's own tail, started with it
    ledger.record_event("bank", "distill.run", actor="distiller", detail={"seconds": 1.0, "ok": True})
    ledger.record_event("bank", "distill.run", actor="distiller", detail={"seconds": 12.5, "ok": True})
    ledger.record_event("bank", "distill.run", actor="distiller", detail={"seconds": 2.0, "status": "failed"})
    ledger.record_event("bank", "settings", actor="admin", detail={"threshold": 0.5})
    tail.poll()
    assert tail.poll() == 0  # each run is counted once
    text = httpx.get(gw.url + "/metrics").text
    assert value(text, "kdgate_distiller_runs_total", route="bank", outcome="ok") == 2
    assert value(text, "kdgate_distiller_runs_total", route="bank", outcome="failed") == 1
    assert value(text, "kdgate_distiller_run_seconds_sum", route="bank") == pytest.approx(15.5)
