"""The stand-in teacher's other protocols: OpenAI's Responses and legacy completions, Anthropic's
Messages, each written here from the providers' API references (not from the gateway's own
translation code, so that a test through a stand-in checks the gateway against the protocol, not
against itself).

Each function takes the request body and the answer text the stand-in chose, and sends the
provider's response: a JSON body, or its server-sent events with ``stream: true``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

import orjson

from bench.asgi import Send, send_json

__all__ = ["conversation", "send_response", "send_message", "send_completion", "anthropic_error"]


def _count(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text or ""))


def _text(content: Any) -> Any:
    """A content value as the chat form's ``content`` would be (a lone text part: its text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text")]
        if len(texts) == len(content):
            return "".join(texts)
    return content


def conversation(path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's turns as (role, content) messages: what the stand-in keys its answers by."""
    if path.endswith("/responses"):
        turns = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
        items = body.get("input")
        if isinstance(items, str):
            return turns + [{"role": "user", "content": items}]
        for item in items or []:
            if item.get("type", "message") == "message":
                turns.append({"role": item.get("role"), "content": _text(item.get("content"))})
            elif item.get("type") == "function_call_output":
                turns.append({"role": "tool", "content": item.get("output")})
        return turns
    if path.endswith("/messages"):
        system = body.get("system")
        turns = [{"role": "system", "content": _text(system)}] if system else []
        return turns + [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body.get("messages") or []]
    prompt = body.get("prompt")
    return [{"role": "user", "content": prompt[0] if isinstance(prompt, list) and prompt else prompt}]


def _pieces(answer: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", answer) or [""]


def _id(prefix: str) -> str:
    return prefix + hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:24]


async def _events(send: Send, events: list[tuple[str | None, dict[str, Any]]], *, done: bool = False) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for name, payload in events:
        head = b"event: " + name.encode() + b"\n" if name else b""
        await send({"type": "http.response.body", "body": head + b"data: " + orjson.dumps(payload) + b"\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n" if done else b"", "more_body": False})


# -- OpenAI Responses (https://platform.openai.com/docs/api-reference/responses) ------------------

async def send_response(send: Send, body: dict[str, Any], answer: str, model: str) -> None:
    prompt = sum(_count(json.dumps(t["content"]) if not isinstance(t["content"], str) else t["content"])
                 for t in conversation("/responses", body))
    usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": max(1, _count(answer)),
             "output_tokens_details": {"reasoning_tokens": 0}}
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    rid, mid = _id("resp_"), _id("msg_")
    message = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": answer, "annotations": [], "logprobs": []}]}

    def response(status: str, output: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "error": None,
                "incomplete_details": None, "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
                "temperature": body.get("temperature", 1.0), "text": body.get("text") or {"format": {"type": "text"}},
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0),
                "truncation": "disabled", "usage": usage if with_usage else None, "metadata": body.get("metadata") or {},
                "store": body.get("store", True)}

    if not body.get("stream"):
        return await send_json(send, 200, response("completed", [message], True))
    seq = iter(range(10_000))
    events: list[tuple[str | None, dict[str, Any]]] = []

    def add(kind: str, **payload: Any) -> None:
        events.append((kind, {"type": kind, "sequence_number": next(seq), **payload}))

    add("response.created", response=response("in_progress", [], False))
    add("response.in_progress", response=response("in_progress", [], False))
    add("response.output_item.added", output_index=0, item={**message, "status": "in_progress", "content": []})
    add("response.content_part.added", item_id=mid, output_index=0, content_index=0,
        part={"type": "output_text", "text": "", "annotations": []})
    for piece in _pieces(answer):
        add("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=piece, logprobs=[])
    add("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=answer, logprobs=[])
    add("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=message["content"][0])
    add("response.output_item.done", output_index=0, item=message)
    add("response.completed", response=response("completed", [message], True))
    await _events(send, events)


# -- Anthropic Messages (https://docs.anthropic.com/en/api/messages) ------------------------------

def anthropic_error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


async def send_message(send: Send, body: dict[str, Any], answer: str, model: str) -> None:
    if not isinstance(body.get("max_tokens"), int):
        return await send_json(send, 400, anthropic_error("max_tokens: Field required"))
    prompt = sum(_count(t["content"] if isinstance(t["content"], str) else json.dumps(t["content"]))
                 for t in conversation("/messages", body))
    out_tokens = max(1, _count(answer))
    mid = _id("msg_")
    if not body.get("stream"):
        return await send_json(send, 200, {
            "id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": answer}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": out_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0},
        })
    events: list[tuple[str | None, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    for piece in _pieces(answer):
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": out_tokens}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    await _events(send, events)


# -- OpenAI legacy completions (https://platform.openai.com/docs/api-reference/completions) -------

async def send_completion(send: Send, body: dict[str, Any], answer: str, model: str) -> None:
    prompt = body.get("prompt")
    prompt_text = prompt[0] if isinstance(prompt, list) and prompt else prompt
    usage = {"prompt_tokens": _count(str(prompt_text)), "completion_tokens": max(1, _count(answer))}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    cid, created = _id("cmpl-"), int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": model}
    if not body.get("stream"):
        return await send_json(send, 200, {**head, "choices": [{"text": answer, "index": 0, "logprobs": None,
                                                                  "finish_reason": "stop"}], "usage": usage})
    events: list[tuple[str | None, dict[str, Any]]] = [
        (None, {**head, "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]}) for piece in _pieces(answer)
    ]
    events.append((None, {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**head, "choices": [], "usage": usage}))
    await _events(send, events, done=True)
