"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) over chat completions.

Request -> chat body (:func:`to_chat`):

    Messages                                    chat completions
    system (string or text blocks)              first message, role system
    message content string                      content string
    text block                                  text part (one text part -> a plain string)
    image block, source base64 / url            image_url part (base64 as a data: URL)
    document block, source base64 / text        file part (data: URL) / text part
    assistant tool_use {id, name, input}        assistant tool_calls (arguments: input as JSON)
    user tool_result {tool_use_id, content}     a tool message each, before the turn's other parts
    thinking, redacted_thinking blocks          ignored (the answer is reasoned afresh)
    max_tokens                                  max_tokens
    stop_sequences                              stop
    temperature, top_p, stream                  the same (stream also asks for the usage chunk)
    top_k                                       top_k (a chat teacher gets it only if the operator
                                                allows it: teacher_extra_params)
    tools [{name, description, input_schema}]   tools [{type: function, function: {..., parameters}}]
    tool_choice auto / any / tool / none        auto / required / {function} / none;
      disable_parallel_tool_use                 parallel_tool_calls: false
    metadata.user_id                            user (other metadata keys, such as route, kept)
    output_config.format json_schema            response_format json_schema
    cache_control, service_tier, thinking,      ignored (reported)
      output_config.effort, inference_geo,
      is_error of a tool_result
    server tools, image/document file ids,      unmapped: an Anthropic teacher called natively can
      container, mcp_servers, search results,     serve them, a chat teacher or student cannot
      images inside a tool_result

A final assistant turn (Anthropic's "prefill", which the answer continues) is carried as it is: a
teacher reached through litellm's Anthropic adapter continues it, an OpenAI-style model answers after it.

Chat completion -> Message (:func:`from_chat`): text -> a text block, each tool call -> a tool_use
block (``input`` parsed from the arguments); finish ``stop`` -> ``end_turn`` (``stop_sequence`` with
the matched string when the producer names it, as vLLM does), ``length`` -> ``max_tokens``,
``tool_calls`` -> ``tool_use``, ``content_filter`` -> ``refusal``; usage: ``input_tokens`` are the
prompt tokens not read from a cache, ``cache_read_input_tokens`` the cached ones.

Errors are Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}`` (:func:`error_body`).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import BadRequest, GatewayError, UpstreamError
from gateway.limits import estimate_prompt_tokens
from gateway.surfaces import (
    ChatRequest,
    check_range,
    check_type,
    first_choice,
    refuse_provider_options,
    token_counts,
)
from gateway.surfaces.sse import ChatStreamReader, Step, event

__all__ = [
    "PARAMS", "COUNT_TOKENS_PARAMS", "validate", "to_chat", "from_chat", "MessagesStream", "count_tokens",
    "error_type", "error_body", "usage_of", "answer_text", "from_native_to_chat", "assemble_native_stream",
]

# Anthropic's documented request fields (https://docs.anthropic.com/en/api/messages).
PARAMS: frozenset[str] = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
    "tool_choice", "metadata", "stream", "thinking", "service_tier", "container", "mcp_servers",
    "context_management", "output_config", "inference_geo", "cache_control",
})
COUNT_TOKENS_PARAMS: frozenset[str] = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "context_management",
    "output_config", "cache_control",
})

_BLOCK_TYPES = {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                "search_result", "server_tool_use", "web_search_tool_result", "container_upload"}
_IGNORED = ("service_tier", "thinking", "inference_geo", "cache_control", "context_management")
_UNMAPPED = ("container", "mcp_servers")


# -- validation -------------------------------------------------------------------------------

def validate(body: dict[str, Any], *, count_tokens: bool = False) -> None:
    """Refuse what the Messages API itself refuses (``max_tokens`` is required, except when
    counting tokens), naming the field the way Anthropic does (``messages.0.content``)."""
    refuse_provider_options(body)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: Field required", param="model")
    if not count_tokens:
        if body.get("max_tokens") is None:
            raise BadRequest("max_tokens: Field required", param="max_tokens")
        check_range(body, "max_tokens", 1, 1_000_000, integer=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty array of messages", param="messages")
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        if not isinstance(message, dict):
            raise BadRequest(f"{path}: must be a message object", param=path)
        if message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{path}.role: Input should be 'user' or 'assistant'", param=f"{path}.role")
        _validate_content(message.get("content"), f"{path}.content")
    system = body.get("system")
    text_blocks = isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system)
    if system is not None and not isinstance(system, str) and not text_blocks:
        raise BadRequest("system: must be a string or an array of text blocks", param="system")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise BadRequest("stop_sequences: must be an array of strings", param="stop_sequences")
    check_range(body, "temperature", 0, 1)
    check_range(body, "top_p", 0, 1)
    check_range(body, "top_k", 0, 1_000_000, integer=True)
    check_type(body, "stream", bool, "a boolean")
    check_type(body, "metadata", dict, "an object")
    check_type(body, "tools", list, "an array of tools")
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BadRequest(f"tools.{i}.name: Field required", param=f"tools.{i}.name")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise BadRequest("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'", param="tool_choice.type")
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            raise BadRequest("tool_choice.name: Field required", param="tool_choice.name")


def _validate_content(content: Any, path: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"{path}: must be a string or an array of content blocks", param=path)
    for j, block in enumerate(content):
        where = f"{path}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in _BLOCK_TYPES:
            raise BadRequest(f"{where}.type: unknown content block type {kind!r}", param=f"{where}.type")
        required = {"text": ("text",), "image": ("source",), "document": ("source",),
                    "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",)}.get(kind, ())
        for name in required:
            if block.get(name) is None:
                raise BadRequest(f"{where}.{name}: Field required", param=f"{where}.{name}")
        if kind == "tool_use" and not isinstance(block["input"], dict):
            raise BadRequest(f"{where}.input: must be an object", param=f"{where}.input")


# -- request -> chat --------------------------------------------------------------------------

def to_chat(body: dict[str, Any]) -> ChatRequest:
    """The request as one chat body, with what it leaves out (see the module's table)."""
    ignored: list[str] = []
    unmapped: list[str] = []
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        messages.append({"role": "system", "content": _parts(list(enumerate(system)), "system", ignored, unmapped)})
    for i, message in enumerate(body["messages"]):
        messages += _chat_messages(message, f"messages.{i}", ignored, unmapped)
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    for name in ("max_tokens", "temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    tools = _tools(body.get("tools") or [], unmapped)
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice:
        kind = choice["type"]
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {
            "type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    meta = body.get("metadata") or {}
    if meta.get("user_id"):
        chat["user"] = meta["user_id"]
    rest = {k: v for k, v in meta.items() if k != "user_id"}
    if rest:
        chat["metadata"] = rest
    output_config = body.get("output_config") or {}
    fmt = output_config.get("format") or {}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
    if output_config.get("effort"):
        ignored.append("output_config.effort")
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # message_delta always carries usage
    ignored += [name for name in _IGNORED if body.get(name) is not None]
    unmapped += [name for name in _UNMAPPED if body.get(name)]
    ignored += sorted(name for name in body if name not in PARAMS)
    return ChatRequest(chat, tuple(dict.fromkeys(ignored)), tuple(unmapped))


def _chat_messages(message: dict[str, Any], path: str, ignored: list[str], unmapped: list[str]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results first (chat wants each right after the
    assistant's calls), then the turn itself."""
    content = message.get("content")
    role = message["role"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    out: list[dict[str, Any]] = []
    rest: list[tuple[int, dict[str, Any]]] = []  # the turn's other blocks, with their positions
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block["type"]
        where = f"{path}.content.{j}"
        if kind == "tool_result":
            if block.get("is_error"):
                ignored.append(f"{where}.is_error")
            result = block.get("content")
            if isinstance(result, list):
                result = _parts(list(enumerate(result)), f"{where}.content", ignored, unmapped)
                if isinstance(result, list) and any(p["type"] != "text" for p in result):
                    unmapped.append(f"{where}.content")  # a chat tool message carries text only
                    result = [p for p in result if p["type"] == "text"]
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result or ""})
        elif kind == "tool_use":
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": orjson.dumps(block["input"]).decode()}})
        else:
            rest.append((j, block))
    if rest or calls or not out:
        parts = _parts(rest, f"{path}.content", ignored, unmapped) if rest else None
        turn: dict[str, Any] = {"role": role, "content": parts or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _parts(blocks: list[tuple[int, dict[str, Any]]], path: str, ignored: list[str], unmapped: list[str]) -> str | list[dict[str, Any]]:
    """Content blocks (with their positions, for naming) as chat parts; a lone text part becomes a string."""
    parts: list[dict[str, Any]] = []
    for j, block in blocks:
        kind = block.get("type")
        source = block.get("source") or {}
        if block.get("cache_control"):
            ignored.append("cache_control")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image" and source.get("type") in ("base64", "url"):
            url = source["url"] if source["type"] == "url" else f"data:{source.get('media_type')};base64,{source.get('data')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "document" and source.get("type") == "base64":
            file = {"file_data": f"data:{source.get('media_type')};base64,{source.get('data')}"}
            if block.get("title"):
                file["filename"] = block["title"]
            parts.append({"type": "file", "file": file})
        elif kind == "document" and source.get("type") == "text":
            parts.append({"type": "text", "text": source.get("data", "")})
        elif kind in ("thinking", "redacted_thinking"):
            ignored.append(f"{path}.{j}")
        else:
            unmapped.append(f"{path}.{j}")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tools(tools: list[dict[str, Any]], unmapped: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):  # a server tool (web search, code execution, ...)
            unmapped.append(f"tools.{i}")
            continue
        fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def count_tokens(body: dict[str, Any]) -> dict[str, int]:
    """``/v1/messages/count_tokens``: an estimate, the gateway's documented one
    (:func:`gateway.limits.estimate_prompt_tokens`: UTF-8 bytes / 4 of every text, plus 4 per
    message) of the request's chat form, tools included. Not Anthropic's tokenizer."""
    validate(body, count_tokens=True)
    return {"input_tokens": estimate_prompt_tokens(to_chat(body).body)}


# -- chat -> message --------------------------------------------------------------------------

def from_chat(chat_response: dict[str, Any], request: dict[str, Any], *, response_id: str, created: int = 0) -> dict[str, Any]:
    """A chat completion (teacher's or student's; ``usage`` may be absent) as an Anthropic Message.
    ``created`` is unused (a Message has no timestamp); it keeps the surfaces' signatures alike."""
    message, finish, matched = first_choice(chat_response)
    calls = message.get("tool_calls") or []
    text = "".join(t for t in (message.get("content"), message.get("refusal")) if isinstance(t, str))
    content: list[dict[str, Any]] = []
    if text or not calls:
        content.append({"type": "text", "text": text})
    for j, call in enumerate(calls):
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{response_id}_{j}",
                        "name": fn.get("name") or "", "input": _tool_input(fn.get("arguments"))})
    stop_reason, stop_sequence = _stop(finish, matched, request, bool(calls))
    return {
        "id": response_id, "type": "message", "role": "assistant",
        "model": chat_response.get("model") or request["model"], "content": content,
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": _usage(chat_response.get("usage")),
    }


def _tool_input(arguments: str | None) -> dict[str, Any]:
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamError("The answer's tool call arguments are not a JSON object, so they cannot be a tool_use input.")
    return value


def _stop(finish: str | None, matched: Any, request: dict[str, Any], has_calls: bool) -> tuple[str, str | None]:
    if finish == "length":
        return "max_tokens", None
    if has_calls or finish in ("tool_calls", "function_call"):  # some producers finish "stop" with calls
        return "tool_use", None
    if finish == "content_filter":
        return "refusal", None
    # a chat answer does not say which stop sequence ended it, unless the producer does (vLLM's stop_reason)
    if isinstance(matched, str) and matched in (request.get("stop_sequences") or []):
        return "stop_sequence", matched
    return "end_turn", None


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    prompt, completion, cached, _ = token_counts(usage) or (0, 0, 0, 0)
    return {"input_tokens": max(prompt - cached, 0), "output_tokens": completion,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


# -- streaming --------------------------------------------------------------------------------

class MessagesStream:
    """Chat chunks in, Messages SSE events out (every event has its ``event:`` line: the SDK
    skips events without one).

    ``start()`` sends message_start (its input_tokens the :func:`count_tokens` estimate; the real
    count follows in message_delta) and a ping; ``feed`` the content blocks' events; ``finish()``
    content_block_stop, message_delta (stop_reason, usage) and message_stop; ``error(exc)`` an
    ``error`` event. (The ledger logs the chat form: ``gateway.protocol.assemble_stream`` of the chunks.)
    """

    def __init__(self, request: dict[str, Any], *, response_id: str, created: int = 0):
        self.request = request
        self.response_id = response_id
        self._reader = ChatStreamReader()
        self._started = False

    def start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        estimate = estimate_prompt_tokens(to_chat(self.request).body)
        head = {"id": self.response_id, "type": "message", "role": "assistant", "model": self.request["model"],
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": estimate, "output_tokens": 0}}
        return [event("message_start", {"type": "message_start", "message": head}), event("ping", {"type": "ping"})]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out = self.start()
        for step in self._reader.feed(chunk):
            out.append(self._step(step))
        return out

    def finish(self) -> list[bytes]:
        out = self.start() + [self._step(step) for step in self._reader.close()]
        reader = self._reader
        has_calls = any(b.kind == "tool" for b in reader.blocks)
        stop_reason, stop_sequence = _stop(reader.finish_reason, reader.stop_reason, self.request, has_calls)
        usage = _usage(reader.usage)
        if reader.usage is None:
            del usage["input_tokens"]  # unknown: message_start's estimate stands
        out.append(event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": usage}))
        return out + [event("message_stop", {"type": "message_stop"})]

    def error(self, exc: GatewayError) -> list[bytes]:
        """The in-band failure once the status line is gone (the SDK raises it as an APIStatusError)."""
        return self.start() + [event("error", error_body(exc))]

    def _step(self, step: Step) -> bytes:
        kind, block, fragment = step
        if kind == "open":
            if block.kind == "text":
                started = {"type": "text", "text": ""}
            else:
                call_id = block.call_id or f"toolu_{self.response_id}_{block.position}"
                started = {"type": "tool_use", "id": call_id, "name": block.name, "input": {}}
            return event("content_block_start", {"type": "content_block_start", "index": block.position,
                                                 "content_block": started})
        if kind == "delta":
            delta = ({"type": "text_delta", "text": fragment} if block.kind == "text"
                     else {"type": "input_json_delta", "partial_json": fragment})
            return event("content_block_delta", {"type": "content_block_delta", "index": block.position, "delta": delta})
        return event("content_block_stop", {"type": "content_block_stop", "index": block.position})


# -- errors -----------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 4xx: invalid_request_error, 5xx: api_error)."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(exc: GatewayError) -> dict[str, Any]:
    """An error in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": error_type(exc.status), "message": exc.message}}


# -- native Messages answers (an Anthropic teacher called on this surface directly) -------------

def usage_of(message: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt_tokens, completion_tokens, cached_tokens) of a Message, in chat's sense: prompt
    tokens count cache reads and cache writes too (priced here at the plain input price)."""
    usage = message.get("usage") or {}
    cached = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    return int(usage.get("input_tokens") or 0) + cached + written, int(usage.get("output_tokens") or 0), cached


def answer_text(message: dict[str, Any]) -> str:
    """The answer's text: its text blocks, joined."""
    return "".join(b.get("text") or "" for b in message.get("content") or [] if b.get("type") == "text")


def from_native_to_chat(message: dict[str, Any]) -> dict[str, Any]:
    """A native Message as a chat completion, so the ledger logs one form."""
    calls = [
        {"id": b.get("id"), "type": "function",
         "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
        for b in message.get("content") or [] if b.get("type") == "tool_use"
    ]
    text = answer_text(message)
    answer: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        answer["tool_calls"] = calls
    finish = {"max_tokens": "length", "model_context_window_exceeded": "length", "tool_use": "tool_calls",
              "refusal": "content_filter"}.get(message.get("stop_reason") or "", "stop")
    prompt, completion, cached = usage_of(message)
    return {
        "id": message.get("id"), "object": "chat.completion", "created": 0, "model": message.get("model"),
        "choices": [{"index": 0, "message": answer, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }


def assemble_native_stream(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Message a native Messages stream amounts to (its events' parsed data, in order); None
    when it never started. Tool inputs are parsed from their JSON fragments at the end."""
    message: dict[str, Any] | None = None
    fragments: dict[int, str] = {}
    for ev in events:
        kind = ev.get("type")
        if kind == "message_start":
            message = {**ev["message"], "content": list(ev["message"].get("content") or []),
                       "usage": dict(ev["message"].get("usage") or {})}
        elif message is None:
            continue
        elif kind == "content_block_start":
            message["content"].append(dict(ev["content_block"]))
        elif kind == "content_block_delta":
            block, delta = message["content"][ev["index"]], ev.get("delta") or {}
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                fragments[ev["index"]] = fragments.get(ev["index"], "") + delta.get("partial_json", "")
        elif kind == "message_delta":
            message.update({k: v for k, v in (ev.get("delta") or {}).items() if k in ("stop_reason", "stop_sequence")})
            message["usage"].update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
    if message is not None:
        for index, text in fragments.items():
            try:
                message["content"][index]["input"] = orjson.loads(text) if text else {}
            except orjson.JSONDecodeError:
                message["content"][index]["input"] = {}
    return message
