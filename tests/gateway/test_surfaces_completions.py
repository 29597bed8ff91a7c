"""The legacy completions surface (gateway/surfaces/completions.py), checked with the openai SDK's
``Completion`` model and its real client through an in-process transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types import Completion

from gateway.errors import BadRequest, GatewayError, UpstreamError
from gateway.protocol import assemble_stream
from gateway.surfaces import completions
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


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": {"text": "x"}}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "m", "prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": "x", "custom_llm_provider": "openai"}, "custom_llm_provider"),
])
def test_completions_validation_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        completions.validate(body)
    assert err.value.param == param


def test_completions_params_are_the_documented_fields() -> None:
    from openai.types.completion_create_params import CompletionCreateParamsBase
    assert completions.PARAMS == set(CompletionCreateParamsBase.__annotations__) | {"stream"}


def test_completions_prompt_becomes_one_user_message() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Translate to French: cheese", "temperature": 0, "stop": ["\n"],
            "n": 2, "seed": 7, "user": "u", "stream": True, "stream_options": {"include_usage": False}, "best_of": 2}
    completions.validate(body)
    chat = completions.to_chat(body)
    assert chat.body == {
        "model": "gpt-3.5-turbo-instruct", "messages": [{"role": "user", "content": "Translate to French: cheese"}],
        "temperature": 0, "n": 2, "stop": ["\n"], "seed": 7, "user": "u",
        "max_tokens": completions.DEFAULT_MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True},
    }
    assert chat.ignored == () and chat.unmapped == ()
    one = completions.to_chat({"model": "m", "prompt": ["only one"], "max_tokens": 100, "logprobs": 2})
    assert one.body["messages"][0]["content"] == "only one" and one.body["max_tokens"] == 100
    assert one.body["logprobs"] is True and one.body["top_logprobs"] == 2


@pytest.mark.parametrize("prompt", [["a", "b"], [1, 2, 3], [[1, 2]]])
def test_completions_batches_and_token_prompts_are_refused(prompt: list[Any]) -> None:
    body = {"model": "m", "prompt": prompt}
    completions.validate(body)  # the surface accepts them ...
    with pytest.raises(BadRequest) as err:  # ... a chat model cannot answer them as one turn
        completions.to_chat(body)
    assert err.value.param == "prompt"


def test_completions_what_does_not_map() -> None:
    chat = completions.to_chat({"model": "m", "prompt": "def f(", "suffix": "return x", "best_of": 3, "echo": True,
                                "logprobs": 1, "max_tokens": 0, "frobnicate": 1})
    assert chat.unmapped == ("max_tokens", "echo", "suffix", "best_of") and chat.ignored == ("frobnicate",)
    with pytest.raises(BadRequest) as err:
        chat.require_chat()
    assert err.value.param == "max_tokens"


def test_completions_from_chat_validates_with_the_sdk() -> None:
    request = {"model": "m", "prompt": "Say hi", "n": 2}
    chat = chat_completion(text=("Hi", "!"))
    chat["choices"].append({"index": 1, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "length"})
    parsed = Completion.model_validate(completions.from_chat(chat, request, response_id="cmpl-1", created=3))
    assert [(c.index, c.text, c.finish_reason) for c in parsed.choices] == [(0, "Hi!", "stop"), (1, "Hello", "length")]
    assert parsed.object == "text_completion" and parsed.usage.total_tokens == 30 and parsed.model == "teacher-1"
    bare = completions.from_chat(chat_completion(text=("x",), usage=None), {"model": "m", "prompt": "p"}, response_id="c", created=3)
    assert Completion.model_validate(bare).usage is None


def test_completions_echo_and_logprobs() -> None:
    request = {"model": "m", "prompt": "2+2=", "echo": True, "logprobs": 1}
    chat = chat_completion(text=("4",))
    chat["choices"][0]["logprobs"] = {"content": [
        {"token": "4", "logprob": -0.01, "bytes": [52], "top_logprobs": [{"token": "4", "logprob": -0.01}, {"token": "5", "logprob": -5.0}]},
        {"token": ".", "logprob": -0.5, "bytes": [46], "top_logprobs": []}]}
    parsed = Completion.model_validate(completions.from_chat(chat, request, response_id="c", created=3))
    choice = parsed.choices[0]
    assert choice.text == "2+2=4"
    assert choice.logprobs.tokens == ["4", "."] and choice.logprobs.token_logprobs == [-0.01, -0.5]
    assert choice.logprobs.top_logprobs == [{"4": -0.01, "5": -5.0}, {}] and choice.logprobs.text_offset == [4, 5]


def _completion_chunks(raw: bytes) -> tuple[list[Completion], list[Any]]:
    events = parse_sse(raw)
    assert all(name is None for name, _ in events), "completions streams have no event: lines"
    assert events[-1][1] == "[DONE]"
    # intermediate chunks carry finish_reason null, which the SDK's Completion type (for whole
    # responses) does not allow; everything else is checked by the model
    return [Completion.model_validate({**p, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in p["choices"]]})
            for _, p in events[:-1] if "error" not in p], [p for _, p in events[:-1]]


def test_completions_stream_text_usage_and_done() -> None:
    request = {"model": "m", "prompt": "Say hi", "stream": True, "stream_options": {"include_usage": True}}
    chunks, raw = _completion_chunks(run_stream(completions.CompletionsStream(request, response_id="cmpl-s", created=3),
                                                chat_chunks(text=("Hi", " there"))))
    assert [c["choices"][0]["text"] if c["choices"] else None for c in raw] == ["Hi", " there", "", None]
    assert [c["choices"][0]["finish_reason"] if c["choices"] else None for c in raw] == [None, None, "stop", None]
    assert raw[-1]["usage"] == USAGE and chunks[-1].usage.completion_tokens == 9
    assert {c.id for c in chunks} == {"cmpl-s"} and {c.object for c in chunks} == {"text_completion"}


def test_completions_stream_hides_usage_unless_asked_and_echoes() -> None:
    request = {"model": "m", "prompt": "Q: ", "echo": True, "logprobs": 0}
    lp = {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": []}]}
    chunks = chat_chunks(text=("A",))
    chunks[1]["choices"][0]["logprobs"] = lp
    _, raw = _completion_chunks(run_stream(completions.CompletionsStream(request, response_id="c", created=3), chunks))
    assert all("usage" not in c for c in raw)
    assert raw[0]["choices"][0]["text"] == "Q: " and raw[1]["choices"][0]["text"] == "A"
    assert raw[1]["choices"][0]["logprobs"] == {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{}], "text_offset": [3]}


def test_completions_stream_error_midway() -> None:
    stream = completions.CompletionsStream({"model": "m", "prompt": "x"}, response_id="c", created=3)
    _, raw = _completion_chunks(run_stream(stream, chat_chunks(text=("a", "b")), fail_after=2, exc=UpstreamError("boom")) + b"data: [DONE]\n\n")
    assert raw[-1] == {"error": {"message": "boom", "type": "api_error", "param": None, "code": "upstream_error"}}


def _handler(answer: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> Callable[[httpx2.Request], httpx2.Response]:
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        assert request.url.path == "/v1/completions"
        try:
            completions.validate(body)
            chat = completions.to_chat(body)
            chat.require_chat()
        except GatewayError as exc:
            return json_response(exc.body(), exc.status)
        chunks = answer(chat.body)
        if body.get("stream"):
            return sse_response(run_stream(completions.CompletionsStream(body, response_id="cmpl-e2e", created=3), chunks))
        return json_response(completions.from_chat(assemble_stream(chunks), body, response_id="cmpl-e2e", created=3))
    return handler


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_completions(stream: bool) -> None:
    # strict validation for the whole response; a stream's null finish reasons need the SDK's default
    client = openai.OpenAI(base_url="http://kdgate.test/v1", api_key="k", max_retries=0, _strict_response_validation=not stream,
                           http_client=mock_http(_handler(lambda chat: chat_chunks(text=("echo: ", chat["messages"][0]["content"])))))
    result = client.completions.create(model="m", prompt="ping", max_tokens=5, stream=stream)
    text = "".join(c.choices[0].text for c in result if c.choices) if stream else result.choices[0].text
    assert text == "echo: ping"


def test_openai_client_completions_refusals() -> None:
    client = openai.OpenAI(base_url="http://kdgate.test/v1", api_key="k", max_retries=0,
                           http_client=mock_http(_handler(lambda chat: chat_chunks(text=("x",)))))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="def f(", suffix="pass")
    assert err.value.param == "suffix" and err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=["a", "b"])
    assert err.value.param == "prompt"
