"""OpenAI wire formats: light validation of requests and the shapes of responses and chunks.

Validation is hand-written rather than a full pydantic model on purpose: the hot path pays microseconds,
unknown fields pass through to the teacher untouched (a new OpenAI parameter works the day it ships),
and each error names the offending parameter the way OpenAI does.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.errors import BadRequest

__all__ = ["parse_json_body", "validate_chat", "validate_embeddings", "assemble_stream", "answer_of", "CHAT_SCHEMA"]

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON ({exc.msg} at position {exc.pos}).") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    _check_depth(body)
    return body


MAX_JSON_DEPTH = 64


def _check_depth(body: Any) -> None:
    """Refuse absurdly nested bodies: no OpenAI request nests deeper than a handful of levels, and
    re-serialising one that does would fail further down (orjson stops at 255)."""
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def _check_int(body: dict[str, Any], name: str, lo: int, hi: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer between {lo} and {hi}; got {value!r}.", param=name)


def _check_number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number between {lo} and {hi}; got {value!r}.", param=name)


def validate_chat(body: dict[str, Any]) -> None:
    """Refuse what no provider would accept, with OpenAI's messages; pass everything else through."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of message objects.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of {sorted(_ROLES)}; got {role!r}.", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string or an array of parts.", param=f"messages[{i}].content")
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise BadRequest("'stream' must be a boolean.", param="stream")
    _check_int(body, "n", 1, 128)
    _check_int(body, "max_tokens", 1, 1_000_000)
    _check_int(body, "max_completion_tokens", 1, 1_000_000)
    _check_int(body, "top_logprobs", 0, 20)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "presence_penalty", -2, 2)
    _check_number(body, "frequency_penalty", -2, 2)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise BadRequest("'metadata' must be an object of string values.", param="metadata")


def validate_embeddings(body: dict[str, Any]) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("you must provide a model parameter", param="model")
    inp = body.get("input")
    ok = isinstance(inp, str) or (
        isinstance(inp, list) and inp and all(isinstance(x, (str, int)) or isinstance(x, list) for x in inp)
    )
    if not ok:
        raise BadRequest("'input' must be a string or a non-empty array of strings or tokens.", param="input")


def answer_of(response: dict[str, Any]) -> tuple[str | None, str | None, list[dict[str, Any]] | None]:
    """(text, finish_reason, logprobs content) of a chat completion's first choice."""
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return None, None, None
    first = choices[0]
    message = first.get("message") or {}
    logprobs = first.get("logprobs") or {}
    content = message.get("content")
    return (
        content if isinstance(content, str) else None,
        first.get("finish_reason"),
        logprobs.get("content") if isinstance(logprobs, dict) else None,
    )


def assemble_stream(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the ``chat.completion`` a stream of ``chat.completion.chunk`` objects amounts to."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    head: dict[str, Any] = {}
    for chunk in chunks:
        if not head and chunk.get("id"):
            head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices") or []:
            idx = ch.get("index", 0)
            acc = choices.setdefault(
                idx, {"index": idx, "message": {"role": "assistant", "content": None}, "finish_reason": None, "logprobs": None}
            )
            delta = ch.get("delta") or {}
            if delta.get("role"):
                acc["message"]["role"] = delta["role"]
            if delta.get("content") is not None:
                acc["message"]["content"] = (acc["message"]["content"] or "") + delta["content"]
            if delta.get("refusal") is not None:
                acc["message"]["refusal"] = (acc["message"].get("refusal") or "") + delta["refusal"]
            for tc in delta.get("tool_calls") or []:
                calls = acc["message"].setdefault("tool_calls", [])
                i = tc.get("index", len(calls))
                while len(calls) <= i:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    calls[i]["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    calls[i]["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    calls[i]["function"]["arguments"] += fn["arguments"]
            lp = ch.get("logprobs")
            if isinstance(lp, dict) and lp.get("content"):
                acc["logprobs"] = acc["logprobs"] or {"content": []}
                acc["logprobs"]["content"].extend(lp["content"])
            if ch.get("finish_reason"):
                acc["finish_reason"] = ch["finish_reason"]
    return {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created") or int(time.time()),
        "model": head.get("model"),
        "system_fingerprint": head.get("system_fingerprint"),
        "choices": [choices[i] for i in sorted(choices)],
        "usage": usage,
    }


# The request schema documented in /openapi.json (validation itself is validate_chat, above).
CHAT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string", "enum": sorted(_ROLES)},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
                },
            },
        },
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "metadata": {"type": "object"},
    },
}
