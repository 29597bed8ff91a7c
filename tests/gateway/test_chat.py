"""The gateway end to end: official openai client -> kdgate -> stand-in teacher, ledger asserted."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.auth import create_key
from tests.sql import sql_rows

pytestmark = pytest.mark.both_backends


def _client(gw, key: str | None = None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key or "none", max_retries=0, **kw)


@pytest.fixture
def gw_noauth(make_gateway):
    return make_gateway(auth=False)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_is_answered_by_teacher_and_logged_with_cost(gw_noauth, stream):
    client = _client(gw_noauth)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello world"}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
        ) as raw:
            headers = raw.headers
            chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage for c in chunks if c.usage]
        assert len(usage) == 1 and usage[0].completion_tokens > 0
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        headers = raw.headers
        resp = raw.parse()
        text = resp.choices[0].message.content
        assert resp.usage.prompt_tokens > 0
        assert float(headers["x-kdgate-cost-usd"]) > 0
    assert text == "echo: hello world"
    assert headers["x-kdgate-served-by"] == "teacher"
    route = headers["x-kdgate-route"]
    gw_noauth.flush()
    row = gw_noauth.state.ledger.exchange(headers["x-request-id"])
    assert row["route"] == route and row["status"] == 200 and row["served_by"] == "teacher"
    assert row["answer"] == "echo: hello world" and row["stream"] == int(stream)
    assert json.loads(row["request"])["messages"] == messages
    # priced from litellm's map for gpt-4o-mini: $0.15/M input, $0.60/M output
    expected = row["prompt_tokens"] * 0.15e-6 + row["completion_tokens"] * 0.6e-6
    assert row["cost_usd"] == pytest.approx(expected)


def test_stream_without_include_usage_hides_usage_but_prices_it(gw_noauth):
    client = _client(gw_noauth)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as raw:
        uid = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)
    gw_noauth.flush()
    row = gw_noauth.state.ledger.exchange(uid)
    assert row["cost_usd"] > 0 and row["completion_tokens"] > 0


async def test_async_client_and_parameters_pass_through(gw_noauth, teacher):
    standin, _ = teacher
    client = openai.AsyncOpenAI(base_url=gw_noauth.base_url, api_key="none", max_retries=0)
    resp = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], n=2, logprobs=True, top_logprobs=2, seed=7, temperature=0
    )
    assert len(resp.choices) == 2
    assert resp.choices[0].logprobs.content[0].top_logprobs
    gw_noauth.flush()
    row = sql_rows(gw_noauth.state.ledger, "SELECT * FROM exchanges ORDER BY id DESC LIMIT 1")[0]
    assert json.loads(row["teacher_logprobs"])[0]["token"].startswith("echo")
    assert json.loads(row["request"])["seed"] == 7
    await client.close()


def test_litellm_client_through_gateway(gw_noauth):
    from gateway.money import load_litellm

    litellm = load_litellm()
    resp = litellm.completion(
        model="openai/gpt-4o-mini", api_base=gw_noauth.base_url, api_key="none", messages=[{"role": "user", "content": "via litellm"}]
    )
    assert resp.choices[0].message.content == "echo: via litellm"


def test_embeddings_pass_through_and_logged(make_gateway):
    gw = make_gateway(auth=False, teachers=["openai/text-embedding-3-small"])  # the operator names it
    client = _client(gw)
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a b c", "d"])
    resp = raw.parse()
    assert len(resp.data) == 2
    gw.flush()
    row = gw.state.ledger.exchange(raw.headers["x-request-id"])
    assert row["endpoint"] == "embeddings" and row["cost_usd"] > 0


def test_models_lists_teacher(gw_noauth):
    ids = [m.id for m in _client(gw_noauth).models.list()]
    assert "gpt-4o-mini" in ids


def test_auth_required_and_keys_work(make_gateway):
    gw = make_gateway()
    with pytest.raises(openai.AuthenticationError) as err:
        _client(gw, "kdg-wrong").chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401
    _, key = create_key(gw.state.ledger, "team-a")
    resp = _client(gw, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert resp.choices[0].message.content == "echo: x"
    gw.flush()
    row = sql_rows(gw.state.ledger, "SELECT key_id FROM exchanges ORDER BY id DESC LIMIT 1")[0]
    assert row["key_id"].startswith("key_")
