"""Every client unchanged: the Responses API, Anthropic's Messages, legacy completions and models,
through a real gateway on loopback with the official ``openai`` and ``anthropic`` clients.

The teacher is the stand-in (bench.standin), which speaks chat completions, Responses, completions
and Anthropic Messages: a route whose teacher is an OpenAI model is called natively on Responses and
completions, one whose teacher is an Anthropic model natively on Messages; the other combinations go
through the chat form. ``standin.paths`` says which protocol the gateway spoke.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from gateway.auth import create_key
from tests.sql import sql_rows

CLAUDE = "claude-haiku-4-5"  # a model litellm's price map knows


def _openai(gw, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, **kw)


def _anthropic(gw, key: str = "none", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, **kw)


@pytest.fixture
def openai_gw(make_gateway):
    """A gateway whose default teacher is an OpenAI model (native on Responses and completions)."""
    return make_gateway(auth=False)


@pytest.fixture
def claude_gw(make_gateway, teacher):
    """A gateway whose default teacher is an Anthropic model (native on Messages)."""
    _, server = teacher
    return make_gateway(auth=False, teacher=f"anthropic/{CLAUDE}", teacher_api_base=server.url)


def _row(gw, uid: str) -> dict:
    gw.flush()
    row = gw.state.ledger.exchange(uid)
    assert row is not None, uid
    return row


# -- Responses ---------------------------------------------------------------------------------

@pytest.mark.both_backends
@pytest.mark.parametrize("native", [True, False], ids=["native", "translated"])
def test_responses_plain_stream_and_conversation(openai_gw, claude_gw, teacher, native):
    standin, _ = teacher
    gw = openai_gw if native else claude_gw
    model = "gpt-4o-mini" if native else CLAUDE
    client = _openai(gw)
    raw = client.responses.with_raw_response.create(model=model, instructions="Be terse.", input="hello there")
    first = raw.parse()
    assert first.output_text == "echo: hello there" and first.status == "completed"
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    assert raw.headers["x-kdgate-served-by"] == "teacher" and float(raw.headers["x-kdgate-cost-usd"]) > 0
    row = _row(gw, raw.headers["x-request-id"])
    assert row["endpoint"] == "responses" and row["status"] == 200 and row["answer"] == "echo: hello there"
    assert row["cost_usd"] > 0
    # the ledger keeps the chat form, whatever the door: what the distiller learns from
    assert json.loads(row["request"])["messages"] == [{"role": "system", "content": "Be terse."},
                                                      {"role": "user", "content": "hello there"}]
    assert standin.paths["/v1/responses"] == (1 if native else 0)

    # a follow-up continues the stored conversation (the instructions are not inherited)
    second = client.responses.create(model=model, input="and again", previous_response_id=first.id)
    assert second.output_text == "echo: and again"
    if native:
        sent = standin.last["/v1/responses"]
        assert "previous_response_id" not in sent  # the gateway's store holds the conversation
        texts = [json.dumps(item) for item in sent["input"]]
        assert "hello there" in texts[0] and "echo: hello there" in texts[1] and "and again" in texts[2]
    else:
        sent = standin.last["/v1/messages"]  # litellm's Anthropic call for the chat form
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert client.responses.retrieve(second.id).output_text == "echo: and again"

    # streamed, with OpenAI's event types, and stored before response.completed
    with client.responses.stream(model=model, input="stream this") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final.output_text == "echo: stream this" and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == "echo: stream this"
    gw.flush()
    streamed = sql_rows(gw.state.ledger, "SELECT answer, stream, cost_usd FROM exchanges WHERE endpoint = 'responses' AND stream = 1")
    assert streamed and streamed[0]["answer"] == "echo: stream this" and streamed[0]["cost_usd"] > 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "translated"])
def test_responses_tools_and_json_schema_reach_the_teacher(openai_gw, claude_gw, teacher, native):
    standin, _ = teacher
    gw = openai_gw if native else claude_gw
    model = "gpt-4o-mini" if native else CLAUDE
    client = _openai(gw)
    tool = {"type": "function", "name": "lookup", "description": "Find an order.",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}
    schema = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"], "additionalProperties": False}
    items = [
        {"role": "user", "content": "where is order 7?"},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"id": "7"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"status": "shipped"}'},
    ]
    resp = client.responses.create(model=model, input=items, tools=[tool],
                                   text={"format": {"type": "json_schema", "name": "order", "schema": schema, "strict": True}})
    assert resp.output_text
    if native:
        sent = standin.last["/v1/responses"]
        assert sent["tools"] == [tool] and sent["text"]["format"]["schema"] == schema
        assert [i.get("type", "message") for i in sent["input"]] == ["message", "function_call", "function_call_output"]
    else:
        sent = standin.last["/v1/messages"]
        assert sent["tools"][0]["name"] == "lookup"
        blocks = [b["type"] for m in sent["messages"] for b in (m["content"] if isinstance(m["content"], list) else [])]
        assert "tool_use" in blocks and "tool_result" in blocks


def test_stored_responses_belong_to_their_key(make_gateway):
    gw = make_gateway()
    _, key_a = create_key(gw.state.ledger, "a")
    _, key_b = create_key(gw.state.ledger, "b")
    gw.state.keys.invalidate()
    a, b = _openai(gw, key_a), _openai(gw, key_b)
    kept = a.responses.create(model="gpt-4o-mini", input="mine")
    assert a.responses.retrieve(kept.id).id == kept.id
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError) as err:
        b.responses.create(model="gpt-4o-mini", input="go on", previous_response_id=kept.id)
    assert err.value.body["param"] == "previous_response_id" and err.value.request_id
    unkept = a.responses.create(model="gpt-4o-mini", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(unkept.id)
    a.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(kept.id)


async def test_responses_async_client(openai_gw):
    client = openai.AsyncOpenAI(base_url=openai_gw.base_url, api_key="none", max_retries=0)
    resp = await client.responses.create(model="gpt-4o-mini", input="async hello")
    assert resp.output_text == "echo: async hello"
    stream = await client.responses.create(model="gpt-4o-mini", input="async stream", stream=True)
    deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "echo: async stream"
    await client.close()


# -- Anthropic Messages ------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False], ids=["native", "translated"])
def test_messages_plain_stream_and_count_tokens(openai_gw, claude_gw, teacher, native):
    standin, _ = teacher
    gw = claude_gw if native else openai_gw
    model = CLAUDE if native else "gpt-4o-mini"
    client = _anthropic(gw)
    raw = client.messages.with_raw_response.create(model=model, max_tokens=64, system="Be terse.",
                                                   messages=[{"role": "user", "content": [{"type": "text", "text": "hi claude"}]}])
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].text == "echo: hi claude" and message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    row = _row(gw, raw.headers["x-request-id"])
    assert row["endpoint"] == "messages" and row["answer"] == "echo: hi claude" and row["cost_usd"] > 0
    assert json.loads(row["request"])["messages"][0] == {"role": "system", "content": "Be terse."}
    assert standin.paths["/v1/messages"] == (1 if native else 0)
    if not native:
        assert standin.last["/v1/chat/completions"]["max_tokens"] == 64

    with client.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "stream claude"}],
                                stop_sequences=["###"]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream claude" and final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    if not native:
        assert standin.last["/v1/chat/completions"]["stop"] == ["###"]
    counted = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "count these words please"}])
    assert counted.input_tokens > 0


def test_messages_tools_pass_through_to_a_chat_teacher(openai_gw, teacher):
    standin, _ = teacher
    client = _anthropic(openai_gw)
    tools = [{"name": "lookup", "description": "Find an order.",
              "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}}}]
    messages = [
        {"role": "user", "content": "where is order 7?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"id": "7"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "shipped"}]},
    ]
    out = client.messages.create(model="gpt-4o-mini", max_tokens=32, tools=tools, messages=messages)
    assert out.content[0].type == "text"
    sent = standin.last["/v1/chat/completions"]
    assert sent["tools"][0]["function"]["name"] == "lookup"
    assert sent["messages"][1]["tool_calls"][0]["id"] == "toolu_1"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "shipped"}


def test_messages_errors_are_anthropic_shaped(make_gateway, teacher):
    standin, server = teacher
    gw = make_gateway()  # auth on
    _, key = create_key(gw.state.ledger, "claude-app")
    gw.state.keys.invalidate()
    client = _anthropic(gw, key)  # the SDK sends x-api-key
    assert client.messages.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "ok"}]).content
    with pytest.raises(anthropic.AuthenticationError) as err:
        _anthropic(gw, "kdg-wrong").messages.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no-such-model-xyz", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "not_found_error" and err.value.request_id
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="gpt-4o-mini", max_tokens=8, messages=[])
    assert err.value.body["error"]["type"] == "invalid_request_error"
    # no max_tokens, and bad JSON: the SDK would not send them
    for body in (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}', b"{not json"):
        resp = httpx.post(gw.url + "/v1/messages", content=body,
                          headers={"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"})
        assert resp.status_code == 400 and resp.json()["type"] == "error", resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error" and resp.headers["x-request-id"]
    # teacher down, then rate limited: the status, Anthropic's type and Retry-After
    standin.fault, standin.fault_count = "503", 0
    try:
        with pytest.raises(anthropic.APIStatusError) as err:
            client.messages.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "down"}])
        assert err.value.status_code == 503 and err.value.body["error"]["type"] == "overloaded_error"
        assert err.value.response.headers["retry-after"]
        standin.fault = "429"
        with pytest.raises(anthropic.RateLimitError) as err:
            client.messages.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "busy"}])
        assert err.value.body["error"]["type"] == "rate_limit_error" and err.value.response.headers["retry-after"]
    finally:
        standin.fault = None
    gw.flush()
    failed = sql_rows(gw.state.ledger, "SELECT uid, status FROM exchanges WHERE endpoint = 'messages' AND status >= 400")
    assert {r["status"] for r in failed} >= {400, 404, 429, 503}


# -- legacy completions ------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False], ids=["native", "translated"])
def test_completions_plain_and_stream(openai_gw, claude_gw, teacher, native):
    standin, _ = teacher
    gw = openai_gw if native else claude_gw
    model = "gpt-4o-mini" if native else CLAUDE
    client = _openai(gw)
    raw = client.completions.with_raw_response.create(model=model, prompt="complete me", max_tokens=20)
    done = raw.parse()
    assert done.object == "text_completion" and done.choices[0].text == "echo: complete me"
    assert done.usage.completion_tokens > 0
    row = _row(gw, raw.headers["x-request-id"])
    assert row["endpoint"] == "completions" and row["answer"] == "echo: complete me" and row["cost_usd"] > 0
    assert standin.paths["/v1/completions"] == (1 if native else 0)
    chunks = list(client.completions.create(model=model, prompt="stream me", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: stream me"
    # the gateway asks the teacher for usage (to price the answer); the client, which did not, gets none
    assert all(c.choices for c in chunks) and not any(c.usage for c in chunks)
    asked = list(client.completions.create(model=model, prompt="stream me", max_tokens=20, stream=True,
                                           stream_options={"include_usage": True}))
    assert asked[-1].usage.completion_tokens > 0
    gw.flush()
    streamed = sql_rows(gw.state.ledger, "SELECT answer, cost_usd FROM exchanges WHERE endpoint = 'completions' AND stream = 1")
    assert len(streamed) == 2 and all(r["answer"] == "echo: stream me" and r["cost_usd"] > 0 for r in streamed)


# -- models, unknown models, request ids, Retry-After ----------------------------------------------

def test_models_are_what_clients_may_ask_for(make_gateway):
    gw = make_gateway(auth=False, teachers=["openai/gpt-4o"], routes={"triage": {"aliases": ["triage-model"]}})
    client = _openai(gw)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "make an auto route"}])
    ids = {m.id for m in client.models.list()}
    assert ids == {"gpt-4o-mini", "gpt-4o", "triage", "triage-model"}  # no hashed auto-route ids
    assert client.models.retrieve("gpt-4o-mini").owned_by == "openai"
    assert client.models.retrieve("triage-model").id == "triage-model"
    routes_before = {r.name for r in gw.state.routes.all()}
    for surface in ("chat", "responses", "completions", "model"):
        with pytest.raises(openai.NotFoundError) as err:
            if surface == "chat":
                client.chat.completions.create(model="gpt-4o-mnii", messages=[{"role": "user", "content": "x"}])
            elif surface == "responses":
                client.responses.create(model="no-such-model-xyz", input="x")
            elif surface == "completions":
                client.completions.create(model="no-such-model-xyz", prompt="x")
            else:
                client.models.retrieve("no-such-model-xyz")
        assert err.value.code == "model_not_found" and err.value.request_id, surface
    assert {r.name for r in gw.state.routes.all()} == routes_before  # nothing was learned from them


def test_unknown_models_can_go_to_the_default_teacher_when_the_operator_says_so(make_gateway):
    gw = make_gateway(auth=False, teacher_for_unknown_models="default")
    client = _openai(gw)
    assert client.responses.create(model="gpt-4o-mnii", input="typo").output_text == "echo: typo"
    assert client.models.retrieve("gpt-4o-mnii").id == "gpt-4o-mnii"


def test_error_replies_carry_the_ledger_row_id_and_retry_after(make_gateway, teacher):
    standin, _ = teacher
    gw = make_gateway(auth=False, breaker_failures=2, breaker_reset_s=30, teacher_retries=0)
    client = _openai(gw)
    standin.fault, standin.fault_count = "500", 0
    try:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.APIStatusError) as err:  # the circuit is open now
            client.responses.create(model="gpt-4o-mini", input="x")
    finally:
        standin.fault = None
    assert err.value.status_code == 503
    retry_after = float(err.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 30  # when the circuit half-opens, not the SDK's own back-off
    row = _row(gw, err.value.request_id)
    assert row["status"] == 503 and row["endpoint"] == "responses"


# -- one task through three doors ----------------------------------------------------------------

@pytest.mark.slow
def test_one_task_through_three_doors_is_one_route_and_the_student_answers_each(tmp_path):
    """Chat completions, Responses and Messages requests of one task land on one route; its student,
    trained on pairs from all three, then answers on each surface in that surface's format."""
    import time

    from bench.standin import ReplayTeacher, ServerThread, messages_key
    from distiller.config import DistillerConfig
    from distiller.pipeline import distill_route
    from gateway.app import create_app
    from gateway.settings import load_settings
    from tests.gateway.test_router_e2e import SYSTEM, _dataset

    data = _dataset()
    standin = ReplayTeacher({messages_key(m): a for m, a in data}, model="gpt-4o", labels=["fruit", "vehicle"])
    with ServerThread(standin) as teacher:
        settings = load_settings(db=str(tmp_path / "ledger.db"), artifacts_dir=str(tmp_path / "artifacts"), teacher="openai/gpt-4o",
                                 teacher_api_base=teacher.url + "/v1", auth=False, embedded_distiller=False)
        with ServerThread(create_app(settings)) as server:
            state = server.config.app.state.kdgate
            chat = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)

            def ask(door: int, text: str, *, stream: bool = False) -> tuple[str, str, str]:
                """(answer, served_by, route) through door 0 (chat), 1 (Responses) or 2 (Messages)."""
                if door == 0:
                    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
                    if stream:
                        with chat.chat.completions.with_streaming_response.create(model="gpt-4o", messages=messages, stream=True) as raw:
                            answer = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
                            return answer, raw.headers["x-kdgate-served-by"], raw.headers["x-kdgate-route"]
                    raw = chat.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
                    return raw.parse().choices[0].message.content, raw.headers["x-kdgate-served-by"], raw.headers["x-kdgate-route"]
                if door == 1:
                    if stream:
                        with chat.responses.with_streaming_response.create(model="gpt-4o", instructions=SYSTEM, input=text,
                                                                           stream=True) as raw:
                            events = list(raw.parse())
                            assert events[-1].type == "response.completed"
                            return events[-1].response.output_text, raw.headers["x-kdgate-served-by"], raw.headers["x-kdgate-route"]
                    raw = chat.responses.with_raw_response.create(model="gpt-4o", instructions=SYSTEM, input=text)
                    return raw.parse().output_text, raw.headers["x-kdgate-served-by"], raw.headers["x-kdgate-route"]
                if stream:
                    with claude.messages.with_streaming_response.create(model="gpt-4o", max_tokens=16, system=SYSTEM, stream=True,
                                                                        messages=[{"role": "user", "content": text}]) as raw:
                        events = list(raw.parse())
                        assert events[0].type == "message_start" and events[-1].type == "message_stop"
                        answer = "".join(e.delta.text for e in events if e.type == "content_block_delta")
                        return answer, raw.headers["x-kdgate-served-by"], raw.headers["x-kdgate-route"]
                raw = claude.messages.with_raw_response.create(model="gpt-4o", max_tokens=16, system=SYSTEM,
                                                               messages=[{"role": "user", "content": text}])
                return raw.parse().content[0].text, raw.headers["x-kdgate-served-by"], raw.headers["x-kdgate-route"]

            routes = set()
            for i, (messages, answer) in enumerate(data[:105]):
                got, served, route = ask(i % 3, messages[1]["content"])
                assert (got, served) == (answer, "teacher")
                routes.add(route)
            assert len(routes) == 1, routes  # one task, one route, whatever the door
            [route] = routes
            assert state.writer.flush(10)
            doors = sql_rows(state.ledger, "SELECT endpoint, count(*) AS n FROM exchanges WHERE route = ? GROUP BY endpoint", (route,))
            assert {r["endpoint"]: r["n"] for r in doors} == {"chat.completions": 35, "responses": 35, "messages": 35}
            state.routes.update_settings(route, {"target_agreement": 0.85}, actor="test")
            report = distill_route(state.ledger, route, DistillerConfig(min_pairs=40, finetune="never", min_label_examples=2),
                                   artifacts_root=tmp_path / "artifacts")
            assert sql_rows(state.ledger, "SELECT 1 FROM students WHERE route = ? AND status = 'live'", (route,)), report
            deadline = time.monotonic() + 60
            while not (state.routes.get(route).settings.get("mode") == "cascade" and route in state.students.live):
                assert time.monotonic() < deadline, state.routes.get(route).settings
                time.sleep(0.2)
            for door in (0, 1, 2):
                for stream in (False, True):
                    served = []
                    for messages, answer in data[105:125]:
                        got, by, _ = ask(door, messages[1]["content"], stream=stream)
                        assert got == answer, (door, stream)
                        served.append(by)
                    assert served.count("student") >= 15, (door, stream, served)


def test_stored_responses_are_seen_by_every_replica(make_gateway):
    """Storing goes through the writer (a queue put on the request's path); a follow-up or a delete
    that reaches another replica before the first one's writer has committed still sees it."""
    slow = make_gateway(ledger_flush_ms=400)  # commits at most every 0.4 s
    other = make_gateway(ledger_flush_ms=400)
    _, key = create_key(slow.state.ledger, "app")
    kept = _openai(slow, key).responses.create(model="gpt-4o-mini", input="first turn")
    follow = _openai(other, key).responses.create(model="gpt-4o-mini", input="second turn", previous_response_id=kept.id)
    assert follow.output_text
    assert slow.state.writer.flush() and other.state.writer.flush()
    assert {r["id"] for r in sql_rows(slow.state.ledger, "SELECT id FROM responses")} >= {kept.id, follow.id}
    # deleted through one replica: gone from the other, whose own memory of it has been committed
    _openai(other, key).responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        _openai(slow, key).responses.retrieve(kept.id)
    assert _openai(slow, key).responses.retrieve(follow.id).id == follow.id


def test_a_teacher_without_the_native_path_is_asked_on_chat_and_remembered(openai_gw, teacher):
    """An OpenAI-compatible upstream that has only chat completions answers /v1/responses 404: the
    request is served through chat, and the gateway does not try the native path on it again."""
    standin, _ = teacher
    standin.chat_only = True
    try:
        before = standin.paths.copy()
        client = _openai(openai_gw)
        for text in ("first try", "second try"):
            assert client.responses.create(model="gpt-4o-mini", input=text).output_text == f"echo: {text}"
        chunks = [e.delta for e in client.responses.create(model="gpt-4o-mini", input="streamed", stream=True)
                  if e.type == "response.output_text.delta"]
        assert "".join(chunks) == "echo: streamed"
        assert standin.paths["/v1/responses"] - before["/v1/responses"] == 1
        assert standin.paths["/v1/chat/completions"] - before["/v1/chat/completions"] == 3
    finally:
        standin.chat_only = False
