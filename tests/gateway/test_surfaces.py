"""The Responses surface (gateway/surfaces/responses.py) and what all surfaces share.

Every response and stream event the surface produces is parsed by the official openai SDK's own
models, and the last tests drive the real ``openai.OpenAI`` client against the protocol layer through
an in-process transport (``httpx2.MockTransport``: the SDK's HTTP stack, no server).

The helpers at the top (chat chunk sequences, SSE parsing) are shared with test_surfaces_messages.py
and test_surfaces_completions.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.errors import BadRequest, UpstreamError, UpstreamRateLimited
from gateway.protocol import assemble_stream
from gateway.surfaces import ChatRequest, responses
from gateway.surfaces.sse import ChatStreamReader

# -- shared helpers ---------------------------------------------------------------------------

USAGE = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30,
         "prompt_tokens_details": {"cached_tokens": 5}, "completion_tokens_details": {"reasoning_tokens": 2}}


def chat_chunks(*, text: tuple[str, ...] = (), calls: tuple[tuple[str, str, tuple[str, ...]], ...] = (),
                finish: str = "stop", usage: dict[str, Any] | None = USAGE, model: str = "teacher-1",
                extra_finish: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A chat-completions stream as OpenAI sends it: a role chunk, text pieces, each tool call's
    opening (id, name) then its argument fragments, the finish chunk, then the usage chunk."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **more: Any) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **more}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": piece}) for piece in text]
    for i, (call_id, name, fragments) in enumerate(calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": f}}]}) for f in fragments]
    out.append(chunk({}, finish, **(extra_finish or {})))
    if usage:
        out.append({**head, "choices": [], "usage": usage})
    return out


def chat_completion(**kw: Any) -> dict[str, Any]:
    """The chat completion the same stream amounts to (the gateway's own assemble_stream)."""
    return assemble_stream(chat_chunks(**kw))


def parse_sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of each SSE event; ``[DONE]`` stays a string."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, payload = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                payload.append(line[6:])
        text = "\n".join(payload)
        events.append((name, text if text == "[DONE]" else orjson.loads(text)))
    return events


def run_stream(stream: Any, chunks: list[dict[str, Any]], *, fail_after: int | None = None, exc: Exception | None = None) -> bytes:
    """Feed chunks to a surface's stream converter; fail with ``exc`` after ``fail_after`` chunks."""
    out: list[bytes] = []
    for i, chunk in enumerate(chunks):
        if fail_after is not None and i == fail_after:
            return b"".join(out + stream.error(exc))
        out += stream.feed(chunk)
    return b"".join(out + stream.finish())


def mock_http(handler: Callable[[httpx2.Request], httpx2.Response]) -> httpx2.Client:
    """The SDKs' own HTTP client, answering in-process instead of over a socket."""
    return httpx2.Client(transport=httpx2.MockTransport(handler))


def sse_response(raw: bytes) -> httpx2.Response:
    return httpx2.Response(200, content=raw, headers={"content-type": "text/event-stream"})


def json_response(body: dict[str, Any], status: int = 200) -> httpx2.Response:
    return httpx2.Response(status, content=orjson.dumps(body), headers={"content-type": "application/json"})


# -- what the modules promise about themselves ------------------------------------------------

def test_surfaces_import_no_heavy_libraries() -> None:
    code = ("import sys, gateway.surfaces.responses, gateway.surfaces.messages, gateway.surfaces.completions; "
            "print(sorted(m for m in ('litellm', 'torch', 'fastapi', 'starlette', 'openai', 'anthropic', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reader_blocks_in_order_and_a_late_fragment_counts() -> None:
    reader = ChatStreamReader()
    steps = []
    for chunk in chat_chunks(text=("a", "b"), calls=(("call_1", "f", ('{"x"', ": 1}")), ("call_2", "g", ("{}",))), finish="tool_calls"):
        steps += reader.feed(chunk)
    # a fragment of the first call after the second opened: no event, but the final answer has it
    steps += reader.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": " "}}]}}]})
    steps += reader.close()
    assert [(k, b.position) for k, b, _ in steps] == [
        ("open", 0), ("delta", 0), ("delta", 0), ("close", 0),
        ("open", 1), ("delta", 1), ("delta", 1), ("close", 1), ("open", 2), ("delta", 2), ("close", 2)]
    assert [(b.kind, b.text, b.call_id, b.name) for b in reader.blocks] == [
        ("text", "ab", None, ""), ("tool", '{"x": 1} ', "call_1", "f"), ("tool", "{}", "call_2", "g")]
    assert reader.finish_reason == "tool_calls" and reader.usage == USAGE and reader.model == "teacher-1"


def test_require_chat_names_the_first_unmapped_field() -> None:
    request = ChatRequest({"model": "m", "messages": []}, ignored=("include",), unmapped=("tools[1]", "prompt"))
    with pytest.raises(BadRequest) as err:
        request.require_chat()
    assert err.value.param == "tools[1]" and err.value.status == 400
    assert request.header() == {"x-kdgate-ignored-params": "include,tools[1],prompt"}
    ChatRequest({"model": "m", "messages": []}).require_chat()  # nothing unmapped: fine


# -- Responses: validation --------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"input": "hi"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"model": "m", "input": ["hi"]}, "input[0]"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "user", "content": "a"}, {"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[1].call_id"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "hi", "temperature": 2.5}, "temperature"),
    ({"model": "m", "input": "hi", "stream": "yes"}, "stream"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"model": "m", "input": "hi", "api_base": "http://evil"}, "api_base"),
])
def test_responses_validation_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        responses.validate(body)
    assert err.value.param == param
    assert err.value.message.startswith(param)


def test_responses_params_are_the_documented_fields() -> None:
    from openai.types.responses.response_create_params import ResponseCreateParamsBase
    documented = set(ResponseCreateParamsBase.__annotations__) | {"stream"}
    assert responses.PARAMS <= documented
    assert {"model", "input", "instructions", "previous_response_id", "store", "tools", "tool_choice", "text",
            "max_output_tokens", "temperature", "top_p", "parallel_tool_calls", "metadata", "user", "stream",
            "reasoning"} <= responses.PARAMS


# -- Responses: request -> chat ---------------------------------------------------------------

def test_responses_plain_text_and_instructions() -> None:
    body = {"model": "gpt-4o-mini", "input": "What is 2+2?", "instructions": "Answer briefly.", "stream": True,
            "temperature": 0.2, "max_output_tokens": 50, "metadata": {"route": "math"}, "user": "u1", "store": False}
    responses.validate(body)
    chat = responses.to_chat(body)
    assert chat.body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
        "temperature": 0.2, "metadata": {"route": "math"}, "user": "u1", "max_completion_tokens": 50,
        "stream": True, "stream_options": {"include_usage": True},
    }
    assert chat.ignored == () and chat.unmapped == () and chat.instructions == 1
    assert not responses.should_store(body) and responses.should_store({"model": "m", "input": "x"})


def test_responses_items_multi_turn_tools_images_and_schema() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "model": "gpt-4o",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather where this is?"},
                                         {"type": "input_image", "image_url": "https://x.test/p.png", "detail": "low"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_b", "name": "time", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "noon"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
        "tools": [{"type": "function", "name": "weather", "description": "Weather now", "parameters": schema, "strict": True}],
        "tool_choice": {"type": "function", "name": "weather"},
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}, "verbosity": "low"},
        "reasoning": {"effort": "low"}, "parallel_tool_calls": False,
    }
    responses.validate(body)
    chat = responses.to_chat(body)
    assert chat.body["messages"] == [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather where this is?"},
                                     {"type": "image_url", "image_url": {"url": "https://x.test/p.png", "detail": "low"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
    ]
    assert chat.body["tools"] == [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                                                                    "parameters": schema, "strict": True}}]
    assert chat.body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat.body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert chat.body["verbosity"] == "low" and chat.body["reasoning_effort"] == "low"
    assert chat.body["parallel_tool_calls"] is False
    assert chat.ignored == ("input[7]",) and chat.unmapped == ()


def test_responses_function_call_without_a_preceding_assistant_turn() -> None:
    chat = responses.to_chat({"model": "m", "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
    ], "text": {"format": {"type": "json_object"}}})
    assert chat.body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert chat.body["response_format"] == {"type": "json_object"}


def test_responses_what_does_not_map_is_reported_never_dropped_silently() -> None:
    body = {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}, {"type": "input_text", "text": "hi"}]},
        {"type": "item_reference", "id": "msg_old"},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "chart:"},
                                                                     {"type": "input_image", "image_url": "https://x.test/c.png"}]},
    ], "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}], "tool_choice": {"type": "web_search"},
        "include": ["message.output_text.logprobs"], "truncation": "auto", "background": True, "prompt": {"id": "pmpt_1"},
        "reasoning": {"effort": "high", "summary": "auto"}, "frobnicate": 1}
    responses.validate(body)
    chat = responses.to_chat(body)
    assert chat.unmapped == ("input[0].content[0]", "input[1]", "input[2].output", "tools[1]", "tool_choice", "background", "prompt")
    assert chat.body["messages"][-1] == {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "chart:"}]}
    assert chat.ignored == ("reasoning.summary", "include", "truncation", "frobnicate")
    assert "tool_choice" not in chat.body and len(chat.body["tools"]) == 1
    with pytest.raises(BadRequest) as err:
        chat.require_chat()
    assert err.value.param == "input[0].content[0]"


# -- Responses: chat -> response --------------------------------------------------------------

def test_responses_from_chat_text_validates_with_the_sdk() -> None:
    request = {"model": "my-route", "input": "hi", "instructions": "be kind", "metadata": {"a": "b"}}
    out = responses.from_chat(chat_completion(text=("Hello", " there")), request, response_id="resp_abc", created=1700000000)
    parsed = Response.model_validate(out)
    assert parsed.output_text == "Hello there"
    assert parsed.id == "resp_abc" and parsed.status == "completed" and parsed.model == "teacher-1"
    assert parsed.instructions == "be kind" and parsed.metadata == {"a": "b"}
    usage = parsed.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (21, 9, 30)
    assert usage.input_tokens_details.cached_tokens == 5 and usage.output_tokens_details.reasoning_tokens == 2


def test_responses_from_chat_tool_calls_length_refusal_and_no_usage() -> None:
    request = {"model": "m", "input": "weather?", "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]}
    chat = chat_completion(text=("Let me look.",), calls=(("call_9", "weather", ('{"city":', '"Oslo"}')),), finish="tool_calls", usage=None)
    parsed = Response.model_validate(responses.from_chat(chat, request, response_id="resp_t", created=1))
    assert [item.type for item in parsed.output] == ["message", "function_call"]
    call = parsed.output[1]
    assert (call.call_id, call.name, call.arguments, call.status) == ("call_9", "weather", '{"city":"Oslo"}', "completed")
    assert call.id == "fc_t_1" and parsed.output[0].id == "msg_t_0"
    assert parsed.usage is None and parsed.output_text == "Let me look."

    only_call = chat_completion(calls=(("call_1", "weather", ("{}",)),), finish="tool_calls")
    assert [i.type for i in Response.model_validate(responses.from_chat(only_call, request, response_id="resp_x", created=1)).output] == ["function_call"]

    cut = Response.model_validate(responses.from_chat(chat_completion(text=("Once upon",), finish="length"), request, response_id="resp_l", created=1))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"

    refused = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't."}, "finish_reason": "stop"}]}
    r = Response.model_validate(responses.from_chat(refused, request, response_id="resp_r", created=1))
    assert r.output[0].content[0].type == "refusal" and r.output[0].content[0].refusal == "I can't." and r.model == "m"


def test_previous_response_id_rebuilds_the_conversation_without_old_instructions() -> None:
    first = {"model": "m", "input": "My name is Ada.", "instructions": "Be brief."}
    chat1 = responses.to_chat(first)
    answer1 = chat_completion(text=("Hi Ada.",))
    stored = responses.conversation_after(chat1, answer1)
    assert stored == [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada."}]

    second = {"model": "m", "input": "What is my name?", "instructions": "Be very brief.", "previous_response_id": "resp_1"}
    responses.validate(second)
    chat2 = responses.to_chat(second, history=stored)
    assert chat2.body["messages"] == [{"role": "system", "content": "Be very brief."}, *stored,
                                      {"role": "user", "content": "What is my name?"}]
    assert "previous_response_id" not in chat2.body and chat2.ignored == ()

    answer2 = chat_completion(calls=(("call_n", "lookup", ('{"q":"name"}',)),), finish="tool_calls")
    stored2 = responses.conversation_after(chat2, answer2)
    assert stored2[:-1] == [*stored, {"role": "user", "content": "What is my name?"}]
    assert stored2[-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_n", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"name"}'}}]}
    third = responses.to_chat({"model": "m", "previous_response_id": "resp_2",
                               "input": [{"type": "function_call_output", "call_id": "call_n", "output": "Ada"}]}, history=stored2)
    assert third.body["messages"] == [*stored2, {"role": "tool", "tool_call_id": "call_n", "content": "Ada"}]
    response2 = responses.from_chat(answer2, second, response_id="resp_2", created=1)
    assert Response.model_validate(response2).previous_response_id == "resp_1"


# -- Responses: streaming ---------------------------------------------------------------------

_EVENT = TypeAdapter(ResponseStreamEvent)


def _responses_events(raw: bytes) -> list[Any]:
    """Every event parsed by the SDK's event models; the ``event:`` line must name the data's type."""
    parsed = []
    for name, payload in parse_sse(raw):
        assert name == payload["type"]
        parsed.append(_EVENT.validate_python(payload))
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    return parsed


def _sdk_final_response(events: list[Any], request: dict[str, Any]) -> Any:
    """What the SDK's ``client.responses.stream()`` helper makes of the events."""
    state = ResponseStreamState(input_tools=request.get("tools") or [], text_format=openai.omit)
    for e in events:
        state.handle_event(e)
    return state._completed_response


def test_responses_stream_text() -> None:
    request = {"model": "m", "input": "hi", "stream": True}
    stream = responses.ResponsesStream(request, response_id="resp_s", created=5)
    events = _responses_events(run_stream(stream, chat_chunks(text=("Hel", "lo", "!"))))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello!"
    assert events[7].text == "Hello!" and {e.item_id for e in events[3:9]} == {events[2].item.id} == {"msg_s_0"}
    done = events[-1].response
    assert done.output_text == "Hello!" and done.usage.input_tokens == 21 and done.usage.output_tokens == 9
    assert _sdk_final_response(events, request).output_text == "Hello!"
    assert stream.response["status"] == "completed" and Response.model_validate(stream.response).output_text == "Hello!"


def test_responses_stream_tool_calls_with_argument_fragments() -> None:
    request = {"model": "m", "input": "weather in Oslo and Rome?", "stream": True,
               "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]}
    chunks = chat_chunks(text=("Checking.",), calls=(("call_1", "weather", ('{"ci', 'ty": "Oslo"}')),
                                                     ("call_2", "weather", ('{"city": "Rome"}',))), finish="tool_calls")
    events = _responses_events(run_stream(responses.ResponsesStream(request, response_id="resp_f", created=5), chunks))
    kinds = [(e.type, getattr(e, "output_index", None)) for e in events]
    assert kinds == [
        ("response.created", None), ("response.in_progress", None),
        ("response.output_item.added", 0), ("response.content_part.added", 0), ("response.output_text.delta", 0),
        ("response.output_text.done", 0), ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1), ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2),
        ("response.completed", None)]
    assert events[8].item.call_id == "call_1" and events[8].item.name == "weather" and events[8].item.status == "in_progress"
    assert events[11].arguments == '{"city": "Oslo"}' and events[11].item_id == "fc_f_1"
    final = _sdk_final_response(events, request)
    assert [(i.type, getattr(i, "arguments", None)) for i in final.output] == [
        ("message", None), ("function_call", '{"city": "Oslo"}'), ("function_call", '{"city": "Rome"}')]
    assert final.usage.total_tokens == 30


def test_responses_stream_cut_short_is_incomplete() -> None:
    events = _responses_events(run_stream(responses.ResponsesStream({"model": "m", "input": "x"}, response_id="resp_i", created=5),
                                          chat_chunks(text=("Once",), finish="length")))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"


def test_responses_stream_error_midway() -> None:
    request = {"model": "m", "input": "x"}
    stream = responses.ResponsesStream(request, response_id="resp_e", created=5)
    raw = run_stream(stream, chat_chunks(text=("Par", "tial")), fail_after=2,
                     exc=UpstreamError("The teacher's stream failed: connection reset"))
    events = _responses_events(raw)
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-2].message == "The teacher's stream failed: connection reset" and events[-2].code == "upstream_error"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.output[0].content[0].text == "Par"  # what was sent before the failure
    limited = responses.ResponsesStream(request, response_id="resp_q", created=5).error(UpstreamRateLimited("slow down"))
    assert _responses_events(b"".join(limited))[-1].response.error.code == "rate_limit_exceeded"


# -- Responses: native answers ----------------------------------------------------------------

def test_responses_native_helpers_round_trip() -> None:
    request = {"model": "m", "input": "x"}
    chat = chat_completion(text=("Sure.",), calls=(("call_1", "f", ('{"a":1}',)),), finish="tool_calls")
    native = responses.from_chat(chat, request, response_id="resp_n", created=7)
    assert responses.usage_of(native) == (21, 9, 5)
    assert responses.answer_text(native) == "Sure."
    back = responses.from_native_to_chat(native)
    assert back["choices"][0]["message"] == {"role": "assistant", "content": "Sure.", "tool_calls": chat["choices"][0]["message"]["tool_calls"]}
    assert back["choices"][0]["finish_reason"] == "tool_calls" and back["created"] == 7
    assert back["usage"]["prompt_tokens"] == 21 and back["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}
    cut = responses.from_native_to_chat(responses.from_chat(chat_completion(text=("a",), finish="length", usage=None), request,
                                                            response_id="resp_c", created=7))
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"] is None
    stream = responses.ResponsesStream(request, response_id="resp_n2", created=7)
    events = [payload for _, payload in parse_sse(run_stream(stream, chat_chunks(text=("ok",))))]
    assert responses.assemble_native_stream(events)["output"][0]["content"][0]["text"] == "ok"
    assert responses.assemble_native_stream(events[:3]) is None


# -- Responses: the official client, end to end -----------------------------------------------

def _responses_handler(answer: Callable[[dict[str, Any]], list[dict[str, Any]]], seen: list[Any]) -> Callable[[httpx2.Request], httpx2.Response]:
    """The protocol layer wired the way the gateway wires it, answering from ``answer(chat_body)``."""
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        seen.append((request, body))
        assert request.url.path == "/v1/responses"
        try:
            responses.validate(body)
        except BadRequest as exc:
            return json_response(exc.body(), exc.status)
        chat = responses.to_chat(body)
        chat.require_chat()
        chunks = answer(chat.body)
        if body.get("stream"):
            return sse_response(run_stream(responses.ResponsesStream(body, response_id="resp_e2e", created=9), chunks))
        return json_response(responses.from_chat(assemble_stream(chunks), body, response_id="resp_e2e", created=9))
    return handler


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://kdgate.test/v1", api_key="kd-test", max_retries=0, http_client=mock_http(handler),
                         _strict_response_validation=True)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_responses_create(stream: bool) -> None:
    seen: list[Any] = []
    client = _client(_responses_handler(lambda chat: chat_chunks(text=("You said: ", chat["messages"][-1]["content"])), seen))
    result = client.responses.create(model="m", input="ping", instructions="Echo.", stream=stream)
    if stream:
        events = list(result)
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        text = events[-1].response.output_text
    else:
        text = result.output_text
    assert text == "You said: ping"
    request, body = seen[0]
    assert request.headers["authorization"] == "Bearer kd-test" and body.get("stream", False) is stream


def test_openai_client_responses_stream_helper_and_tools() -> None:
    seen: list[Any] = []
    client = _client(_responses_handler(lambda chat: chat_chunks(calls=(("call_7", "add", ('{"a": 1,', ' "b": 2}')),), finish="tool_calls"), seen))
    tools = [{"type": "function", "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]
    with client.responses.stream(model="m", input="1+2?", tools=tools) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == '{"a": 1, "b": 2}'
    assert final.output[0].type == "function_call" and final.output[0].call_id == "call_7"
    assert seen[0][1]["tools"] == tools


def test_openai_client_sees_a_validation_error() -> None:
    client = _client(_responses_handler(lambda chat: chat_chunks(text=("x",)), []))
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="x", temperature=9)
    assert err.value.status_code == 400 and err.value.param == "temperature"
