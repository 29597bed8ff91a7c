"""The Anthropic Messages surface (gateway/surfaces/messages.py).

Every Message and stream event is parsed by the official anthropic SDK's models (and its own stream
accumulator), and the last tests drive the real ``anthropic.Anthropic`` client against the protocol
layer through an in-process transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from gateway.errors import (
    AuthenticationFailed,
    BadRequest,
    BodyTooLarge,
    GatewayError,
    ModelNotFound,
    PermissionDenied,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.limits import estimate_prompt_tokens
from gateway.protocol import assemble_stream
from gateway.surfaces import messages
from tests.gateway.test_surfaces import (
    USAGE,
    chat_chunks,
    chat_completion,
    json_response,
    mock_http,
    parse_sse,
    run_stream,
    sse_response,
)

BASE = {"model": "claude-x", "max_tokens": 256}


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "c", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({**BASE, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({**BASE}, "messages"),
    ({**BASE, "messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ({**BASE, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages.0.content.0.type"),
    ({**BASE, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f"}]}]}, "messages.1.content.0.input"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages.0.content.0.tool_use_id"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "system": [{"type": "image"}]}, "system"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, "temperature"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": "END"}, "stop_sequences"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [{"description": "x"}]}, "tools.0.name"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "maybe"}}, "tool_choice.type"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({**BASE, "messages": [{"role": "user", "content": "hi"}], "api_key": "sk-ant"}, "api_key"),
])
def test_messages_validation_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        messages.validate(body)
    assert err.value.param == param and err.value.message.startswith(param)


def test_count_tokens_needs_no_max_tokens_and_estimates_the_chat_form() -> None:
    body = {"model": "c", "system": "You sort mail.", "messages": [{"role": "user", "content": "Invoice #4 attached"}],
            "tools": [{"name": "file", "input_schema": {"type": "object"}}]}
    counted = messages.count_tokens(body)
    assert MessageTokensCount.model_validate(counted).input_tokens == estimate_prompt_tokens(messages.to_chat(body).body) > 0
    with pytest.raises(BadRequest):
        messages.count_tokens({"model": "c"})


def test_messages_params_are_the_documented_fields() -> None:
    from anthropic.types.message_create_params import MessageCreateParamsBase
    assert {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
            "tool_choice", "metadata", "stream"} <= messages.PARAMS
    assert messages.COUNT_TOKENS_PARAMS <= messages.PARAMS
    assert {"system", "tools", "output_config", "thinking"} <= set(MessageCreateParamsBase.__annotations__)


# -- request -> chat --------------------------------------------------------------------------

def test_messages_plain_system_and_sampling() -> None:
    body = {**BASE, "system": "Answer in French.", "messages": [{"role": "user", "content": "Hello"}],
            "stop_sequences": ["\n\nHuman:", "END"], "temperature": 0.3, "top_p": 0.9, "top_k": 40,
            "metadata": {"user_id": "u-42"}, "stream": True}
    messages.validate(body)
    chat = messages.to_chat(body)
    assert chat.body == {
        "model": "claude-x", "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
        "max_tokens": 256, "temperature": 0.3, "top_p": 0.9, "top_k": 40, "stop": ["\n\nHuman:", "END"], "user": "u-42",
        "stream": True, "stream_options": {"include_usage": True},
    }
    assert chat.ignored == () and chat.unmapped == ()


def test_messages_blocks_images_tools_and_results() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {
        **BASE,
        "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Where is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "sun"}], "is_error": True},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
        "tools": [{"name": "weather", "description": "Weather now", "input_schema": schema}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    messages.validate(body)
    chat = messages.to_chat(body)
    assert chat.body["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "You are a weather bot."}, {"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Where is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "sun"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat.body["tools"] == [{"type": "function", "function": {"name": "weather", "parameters": schema, "description": "Weather now"}}]
    assert chat.body["tool_choice"] == "required" and chat.body["parallel_tool_calls"] is False
    assert chat.ignored == ("cache_control", "messages.1.content.0", "messages.2.content.1.is_error", "thinking")
    assert chat.unmapped == ()


def test_messages_assistant_turn_of_thinking_and_calls_has_no_content() -> None:
    body = {**BASE, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
        {"role": "assistant", "content": "Prefill: {"},  # carried as it is; the teacher decides what a trailing turn means
    ]}
    messages.validate(body)
    chat = messages.to_chat(body)
    assert chat.body["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": ""},
        {"role": "assistant", "content": "Prefill: {"},
    ]
    assert chat.ignored == ("messages.1.content.0",)


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
])
def test_messages_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = {**BASE, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "weather", "input_schema": {}}], "tool_choice": choice}
    messages.validate(body)
    assert messages.to_chat(body).body["tool_choice"] == expected


def test_messages_json_output_documents_and_what_does_not_map() -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    body = {**BASE, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {"type": "url", "url": "https://x.test/i.png"}}]},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "title": "a.pdf"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain words"}},
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
    ]}], "tools": [{"name": "f", "input_schema": {}}, {"type": "web_search_20250305", "name": "web_search"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        "metadata": {"user_id": "u", "route": "labels"}, "mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]}
    messages.validate(body)
    chat = messages.to_chat(body)
    assert chat.body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert chat.body["metadata"] == {"route": "labels"} and chat.body["user"] == "u"
    assert chat.body["messages"][0] == {"role": "tool", "tool_call_id": "t", "content": ""}  # its image cannot come along
    assert chat.body["messages"][1]["content"] == [
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
        {"type": "text", "text": "plain words"}]
    assert chat.unmapped == ("messages.0.content.0.content", "messages.0.content.3", "tools.1", "mcp_servers")
    assert chat.ignored == ("output_config.effort",)
    with pytest.raises(BadRequest) as err:
        chat.require_chat()
    assert err.value.param == "messages.0.content.0.content"


# -- chat -> Message --------------------------------------------------------------------------

def test_messages_from_chat_text_validates_with_the_sdk() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "hi"}]}
    out = messages.from_chat(chat_completion(text=("Bonjour", "!")), request, response_id="msg_01", created=5)
    message = Message.model_validate(out)
    assert message.content[0].text == "Bonjour!" and message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.id == "msg_01" and message.model == "teacher-1" and message.role == "assistant"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (16, 5, 9)


def test_messages_from_chat_tool_use_stop_reasons_and_no_usage() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["END"]}
    calls = chat_completion(text=("Checking.",), calls=(("call_1", "weather", ('{"city":', '"Oslo"}')),), finish="tool_calls", usage=None)
    message = Message.model_validate(messages.from_chat(calls, request, response_id="msg_t"))
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert (message.content[1].id, message.content[1].name, message.content[1].input) == ("call_1", "weather", {"city": "Oslo"})
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 0 and message.usage.output_tokens == 0
    # a producer that finishes "stop" with tool calls still means tool_use to an Anthropic client
    odd = chat_completion(calls=(("call_2", "f", ("{}",)),), finish="stop")
    assert Message.model_validate(messages.from_chat(odd, request, response_id="m")).stop_reason == "tool_use"
    cut = messages.from_chat(chat_completion(text=("Once",), finish="length"), request, response_id="m")
    assert cut["stop_reason"] == "max_tokens"
    vllm = chat_completion(text=("done",))
    vllm["choices"][0]["stop_reason"] = "END"  # vLLM names the stop string that matched
    matched = Message.model_validate(messages.from_chat(vllm, request, response_id="m"))
    assert (matched.stop_reason, matched.stop_sequence) == ("stop_sequence", "END")
    streamed = _messages_events(run_stream(messages.MessagesStream(request, response_id="m"),
                                           chat_chunks(text=("done",), extra_finish={"stop_reason": "END"})))
    assert (streamed[-2].delta.stop_reason, streamed[-2].delta.stop_sequence) == ("stop_sequence", "END")
    filtered = messages.from_chat(chat_completion(text=("",), finish="content_filter"), request, response_id="m")
    assert Message.model_validate(filtered).stop_reason == "refusal" and filtered["content"] == [{"type": "text", "text": ""}]
    with pytest.raises(UpstreamError):
        messages.from_chat(chat_completion(calls=(("c", "f", ("[1, 2]",)),), finish="tool_calls"), request, response_id="m")


# -- streaming --------------------------------------------------------------------------------

_EVENT = TypeAdapter(RawMessageStreamEvent)


def _messages_events(raw: bytes) -> list[Any]:
    """Every event by the SDK's models (ping and error are handled by name, as the SDK does)."""
    events = []
    for name, payload in parse_sse(raw):
        assert name == payload["type"], "the SDK skips events without a matching event: line"
        if name == "ping":
            continue
        events.append(ErrorResponse.model_validate(payload) if name == "error" else _EVENT.validate_python(payload))
    return events


def _sdk_final_message(events: list[Any]) -> Any:
    snapshot, buffers = None, {}
    for e in events:
        snapshot = accumulate_event(event=e, current_snapshot=snapshot, json_bufs=buffers)
    return snapshot


def test_messages_stream_text() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "Say hello"}], "stream": True}
    raw = run_stream(messages.MessagesStream(request, response_id="msg_s"), chat_chunks(text=("Hel", "lo")))
    assert [name for name, _ in parse_sse(raw)][:2] == ["message_start", "ping"]
    events = _messages_events(raw)
    assert [(e.type, getattr(e, "index", None)) for e in events] == [
        ("message_start", None), ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("message_delta", None), ("message_stop", None)]
    start = events[0].message
    assert start.id == "msg_s" and start.content == [] and start.usage.input_tokens == messages.count_tokens(request)["input_tokens"]
    assert events[5].delta.stop_reason == "end_turn" and events[5].usage.output_tokens == 9
    final = _sdk_final_message(events)
    assert final.content[0].text == "Hello" and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (16, 5, 9)


def test_messages_stream_tool_use_with_argument_fragments() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "weather?"}], "tools": [{"name": "weather", "input_schema": {}}]}
    chunks = chat_chunks(text=("On it.",), calls=(("call_1", "weather", ('{"city"', ': "Oslo"}')), ("call_2", "weather", ('{"city": "Rome"}',))),
                         finish="tool_calls")
    events = _messages_events(run_stream(messages.MessagesStream(request, response_id="msg_f"), chunks))
    assert [(e.type, getattr(e, "index", None)) for e in events] == [
        ("message_start", None), ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    assert events[4].content_block.type == "tool_use" and events[4].content_block.id == "call_1" and events[4].content_block.input == {}
    assert events[5].delta.type == "input_json_delta" and events[5].delta.partial_json == '{"city"'
    final = _sdk_final_message(events)
    assert [getattr(b, "input", None) for b in final.content] == [None, {"city": "Oslo"}, {"city": "Rome"}]
    assert final.stop_reason == "tool_use"


def test_messages_stream_without_usage_keeps_the_start_estimate() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "hi"}]}
    events = _messages_events(run_stream(messages.MessagesStream(request, response_id="m"), chat_chunks(text=("x",), usage=None)))
    assert _sdk_final_message(events).usage.input_tokens == events[0].message.usage.input_tokens > 0


def test_messages_stream_error_midway() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "hi"}]}
    raw = run_stream(messages.MessagesStream(request, response_id="m"), chat_chunks(text=("Par", "tial")), fail_after=3,
                     exc=UpstreamStatus("Overloaded", status=529))
    events = _messages_events(raw)
    assert [e.type for e in events] == ["message_start", "content_block_start", "content_block_delta", "content_block_delta", "error"]
    assert events[-1].error.type == "overloaded_error" and events[-1].error.message == "Overloaded"


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, kind", [
    (BadRequest("bad"), "invalid_request_error"), (AuthenticationFailed("who"), "authentication_error"),
    (PermissionDenied("no"), "permission_error"), (ModelNotFound("none"), "not_found_error"),
    (BodyTooLarge("big"), "request_too_large"), (UpstreamRateLimited("slow"), "rate_limit_error"),
    (GatewayError("bug"), "api_error"), (UpstreamError("down"), "api_error"), (UpstreamTimeout("late"), "timeout_error"),
    (UpstreamStatus("busy", status=529), "overloaded_error"), (UpstreamStatus("teapot", status=418), "invalid_request_error"),
])
def test_messages_error_shape(exc: GatewayError, kind: str) -> None:
    body = messages.error_body(exc)
    assert body == {"type": "error", "error": {"type": kind, "message": exc.message}}
    if kind != "request_too_large":  # documented by Anthropic, but absent from this SDK's ErrorObject union
        assert ErrorResponse.model_validate(body).error.type == kind


# -- native Messages answers ------------------------------------------------------------------

def test_messages_native_helpers() -> None:
    native = {"id": "msg_n", "type": "message", "role": "assistant", "model": "claude-x",
              "content": [{"type": "thinking", "thinking": "..", "signature": "s"}, {"type": "text", "text": "Filed."},
                          {"type": "tool_use", "id": "toolu_1", "name": "file", "input": {"box": 3}}],
              "stop_reason": "tool_use", "stop_sequence": None,
              "usage": {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 2}}
    Message.model_validate(native)
    assert messages.usage_of(native) == (42, 7, 30)
    assert messages.answer_text(native) == "Filed."
    chat = messages.from_native_to_chat(native)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Filed.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "file", "arguments": '{"box":3}'}}]}
    assert chat["choices"][0]["finish_reason"] == "tool_calls"
    assert chat["usage"] == {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49, "prompt_tokens_details": {"cached_tokens": 30}}
    assert messages.from_native_to_chat({**native, "stop_reason": "max_tokens"})["choices"][0]["finish_reason"] == "length"


def test_messages_assemble_native_stream() -> None:
    request = {**BASE, "messages": [{"role": "user", "content": "hi"}]}
    chunks = chat_chunks(text=("Hi",), calls=(("call_1", "f", ('{"a"', ": 1}")),), finish="tool_calls")
    raw = run_stream(messages.MessagesStream(request, response_id="msg_a"), chunks)
    message = messages.assemble_native_stream([payload for _, payload in parse_sse(raw)])
    parsed = Message.model_validate(message)
    assert [getattr(b, "text", None) or getattr(b, "input", None) for b in parsed.content] == ["Hi", {"a": 1}]
    assert parsed.stop_reason == "tool_use" and messages.usage_of(message) == (21, 9, 5)
    assert messages.assemble_native_stream([{"type": "ping"}]) is None


# -- the official client, end to end ----------------------------------------------------------

def _handler(answer: Callable[[dict[str, Any]], list[dict[str, Any]]], seen: list[Any]) -> Callable[[httpx2.Request], httpx2.Response]:
    """The protocol layer wired as the gateway wires it: Anthropic's errors, its stream, count_tokens."""
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        seen.append((request, body))
        try:
            if request.url.path == "/v1/messages/count_tokens":
                return json_response(messages.count_tokens(body))
            assert request.url.path == "/v1/messages"
            messages.validate(body)
            chat = messages.to_chat(body)
            chat.require_chat()
        except GatewayError as exc:
            return json_response(messages.error_body(exc), exc.status)
        chunks = answer(chat.body)
        if body.get("stream"):
            return sse_response(run_stream(messages.MessagesStream(body, response_id="msg_e2e"), chunks))
        return json_response(messages.from_chat(assemble_stream(chunks), body, response_id="msg_e2e"))
    return handler


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> anthropic.Anthropic:
    # Anthropic's base URL has no /v1: the SDK appends /v1/messages itself
    return anthropic.Anthropic(base_url="http://kdgate.test", api_key="kd-test", max_retries=0, http_client=mock_http(handler),
                               _strict_response_validation=True)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_client_messages(stream: bool) -> None:
    seen: list[Any] = []
    client = _client(_handler(lambda chat: chat_chunks(text=("You said: ", chat["messages"][-1]["content"])), seen))
    if stream:
        with client.messages.stream(model="claude-x", max_tokens=64, system="Echo.", messages=[{"role": "user", "content": "ping"}]) as s:
            pieces = list(s.text_stream)
            message = s.get_final_message()
        assert "".join(pieces) == "You said: ping"
    else:
        message = client.messages.create(model="claude-x", max_tokens=64, system="Echo.", messages=[{"role": "user", "content": "ping"}])
    assert message.content[0].text == "You said: ping" and message.usage.output_tokens == 9
    request, body = seen[0]
    # what the wiring must accept: this SDK sends the key as a bearer token; Anthropic's docs, curl and
    # older SDKs send it as x-api-key. Either way an anthropic-version header comes along.
    assert request.headers.get("authorization") == "Bearer kd-test" or request.headers.get("x-api-key") == "kd-test"
    assert request.headers["anthropic-version"]
    assert body.get("stream", False) is stream


def test_anthropic_client_tool_use_count_tokens_and_errors() -> None:
    seen: list[Any] = []
    client = _client(_handler(lambda chat: chat_chunks(calls=(("call_5", "weather", ('{"city": "Oslo"}',)),), finish="tool_calls"), seen))
    tools = [{"name": "weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    message = client.messages.create(model="claude-x", max_tokens=64, tools=tools, messages=[{"role": "user", "content": "Oslo?"}])
    assert message.stop_reason == "tool_use" and message.content[0].input == {"city": "Oslo"}
    counted = client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "Oslo?"}], tools=tools)
    assert counted.input_tokens > 0 and seen[-1][0].url.path == "/v1/messages/count_tokens"
    with pytest.raises(anthropic.BadRequestError) as err:
        # this SDK no longer takes temperature as an argument; the API still documents it
        client.messages.create(model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "x"}], extra_body={"temperature": 3})
    assert err.value.status_code == 400 and err.value.body["error"]["type"] == "invalid_request_error"
    assert err.value.body["error"]["message"].startswith("temperature")


def test_anthropic_client_raises_an_in_band_stream_error() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        stream = messages.MessagesStream(body, response_id="msg_x")
        return sse_response(run_stream(stream, chat_chunks(text=("a", "b")), fail_after=2, exc=UpstreamStatus("Overloaded", status=529)))

    client = _client(handler)
    with pytest.raises(anthropic.APIStatusError) as err, \
            client.messages.stream(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as s:
        list(s.text_stream)
    assert "overloaded_error" in str(err.value)
    assert USAGE["prompt_tokens"] == 21  # the shared fixture is unchanged by the surfaces
