"""OpenAI's Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``) over chat completions.

Request -> chat body (:func:`to_chat`):

    Responses                                  chat completions
    instructions                               first message, role system (not inherited by follow-ups)
    previous_response_id                       ``history``: the stored chain's messages, after it
    input (string)                             one user message
    input message {role, content}              message of that role; parts input_text/output_text ->
                                               text, input_image.image_url -> image_url, input_file
                                               file_data/file_id -> file (one text part -> a string)
    input function_call {call_id, name, args}  assistant tool_calls (joined onto the assistant turn)
    input function_call_output {call_id, ...}  tool message
    input reasoning                            ignored (the answer is reasoned afresh)
    tools [{type: function, name, ...}]        tools [{type: function, function: {...}}]
    tool_choice auto|none|required|{function}  the same, in chat's shape
    text.format json_schema / json_object      response_format
    text.verbosity, reasoning.effort           verbosity, reasoning_effort
    max_output_tokens                          max_completion_tokens
    temperature, top_p, parallel_tool_calls,   the same
      metadata, user, safety_identifier,
      prompt_cache_key(_retention), service_tier,
      stream                                   (plus stream_options.include_usage: usage always comes)
    store                                      consumed: whether the gateway stores the response
    include, truncation, max_tool_calls,       ignored (reported)
      top_logprobs, stream_options,
      reasoning.summary, unknown fields
    hosted tools, item_reference, input_image  unmapped: a native Responses teacher can serve them,
      file_id, background, conversation,         a chat teacher or student cannot
      prompt

Chat completion -> response (:func:`from_chat`): the message's text is one ``message`` item with an
``output_text`` part (a refusal a ``refusal`` part), each tool call a ``function_call`` item
(``call_id`` is the chat tool call's id); finish ``length`` -> status ``incomplete``
(max_output_tokens), ``content_filter`` -> incomplete (content_filter), else ``completed``; usage
prompt/completion/cached/reasoning tokens -> input/output tokens and their details.

Storage (``GET /v1/responses/{id}``, ``previous_response_id``): keep the response object and
:func:`conversation_after`, the chat messages a follow-up continues from.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import BadRequest, GatewayError
from gateway.surfaces import (
    ChatRequest,
    check_range,
    check_type,
    first_choice,
    refuse_provider_options,
    token_counts,
)
from gateway.surfaces.sse import Block, ChatStreamReader, Step, event

__all__ = [
    "PARAMS", "validate", "to_chat", "from_chat", "ResponsesStream", "conversation_after", "should_store",
    "usage_of", "answer_text", "from_native_to_chat", "assemble_native_stream",
]

# OpenAI's documented request fields (https://platform.openai.com/docs/api-reference/responses/create).
PARAMS: frozenset[str] = frozenset({
    "model", "input", "instructions", "previous_response_id", "store", "tools", "tool_choice", "text",
    "max_output_tokens", "max_tool_calls", "temperature", "top_p", "top_logprobs", "parallel_tool_calls",
    "metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier",
    "stream", "stream_options", "reasoning", "include", "truncation", "background", "conversation", "prompt",
})

_ROLES = {"user", "assistant", "system", "developer"}
_COPIED = ("temperature", "top_p", "parallel_tool_calls", "metadata", "user", "safety_identifier",
           "prompt_cache_key", "prompt_cache_retention", "service_tier")
_IGNORED = ("include", "truncation", "max_tool_calls", "top_logprobs", "stream_options")
_UNMAPPED = ("background", "conversation", "prompt")


# -- validation -------------------------------------------------------------------------------

def validate(body: dict[str, Any]) -> None:
    """Refuse what the Responses API itself refuses, naming the param as OpenAI does."""
    refuse_provider_options(body)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: you must provide a model parameter.", param="model")
    items = body.get("input")
    if isinstance(items, list):
        for i, item in enumerate(items):
            _validate_item(item, f"input[{i}]")
    elif not isinstance(items, str):
        raise BadRequest("input: must be a string or an array of input items.", param="input")
    for name in ("instructions", "previous_response_id", "user"):
        check_type(body, name, str, "a string")
    for name in ("stream", "store", "parallel_tool_calls", "background"):
        check_type(body, name, bool, "a boolean")
    for name in ("metadata", "text", "reasoning", "stream_options"):
        check_type(body, name, dict, "an object")
    check_range(body, "max_output_tokens", 1, 1_000_000, integer=True)
    check_range(body, "temperature", 0, 2)
    check_range(body, "top_p", 0, 1)
    check_range(body, "top_logprobs", 0, 20, integer=True)
    check_type(body, "tools", list, "an array of tools")
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise BadRequest(f"tools[{i}]: must be a tool object with a type.", param=f"tools[{i}]")
        if tool["type"] == "function" and not (isinstance(tool.get("name"), str) and tool["name"]):
            raise BadRequest(f"tools[{i}].name: a function tool needs a name.", param=f"tools[{i}].name")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none", "required") and not isinstance(choice, dict):
        raise BadRequest("tool_choice: must be 'auto', 'none', 'required' or an object.", param="tool_choice")
    fmt = (body.get("text") or {}).get("format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_schema", "json_object"):
            raise BadRequest("text.format.type: must be 'text', 'json_schema' or 'json_object'.", param="text.format.type")
        if kind == "json_schema":
            if not isinstance(fmt.get("name"), str) or not fmt["name"]:
                raise BadRequest("text.format.name: a json_schema format needs a name.", param="text.format.name")
            if not isinstance(fmt.get("schema"), dict):
                raise BadRequest("text.format.schema: a json_schema format needs a schema object.", param="text.format.schema")


def _validate_item(item: Any, path: str) -> None:
    if not isinstance(item, dict):
        raise BadRequest(f"{path}: must be an input item object.", param=path)
    kind = item.get("type", "message")
    if kind == "message":
        if item.get("role") not in _ROLES:
            raise BadRequest(f"{path}.role: must be one of {sorted(_ROLES)}; got {item.get('role')!r}.", param=f"{path}.role")
        content = item.get("content")
        if not isinstance(content, (str, list)):
            raise BadRequest(f"{path}.content: must be a string or an array of content parts.", param=f"{path}.content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(f"{path}.content[{j}]: must be a content part with a type.", param=f"{path}.content[{j}]")
    elif kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise BadRequest(f"{path}.{name}: a function_call item needs a string {name}.", param=f"{path}.{name}")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise BadRequest(f"{path}.call_id: a function_call_output item needs a call_id.", param=f"{path}.call_id")
        if not isinstance(item.get("output"), (str, list)):
            raise BadRequest(f"{path}.output: must be a string or an array of content parts.", param=f"{path}.output")


# -- request -> chat --------------------------------------------------------------------------

def to_chat(body: dict[str, Any], *, history: list[dict[str, Any]] | None = None) -> ChatRequest:
    """The request as one chat body. ``history`` is the chat messages of the
    ``previous_response_id`` chain (:func:`conversation_after` of the previous response)."""
    ignored: list[str] = []
    unmapped: list[str] = []
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    instructions = len(messages)
    messages += list(history or [])
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    else:
        messages += _input_messages(items, ignored, unmapped)
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    for name in _COPIED:
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning") or {}
    if reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    if reasoning.get("summary") or reasoning.get("generate_summary"):
        ignored.append("reasoning.summary")
    text = body.get("text") or {}
    fmt = text.get("format") or {}
    if fmt.get("type") == "json_schema":
        schema = {"name": fmt["name"], "schema": fmt["schema"]}
        schema.update({k: fmt[k] for k in ("strict", "description") if fmt.get(k) is not None})
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    if text.get("verbosity"):
        chat["verbosity"] = text["verbosity"]
    tools = _tools(body.get("tools") or [], unmapped)
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        choice = _tool_choice(body["tool_choice"])
        if choice is None:
            unmapped.append("tool_choice")
        else:
            chat["tool_choice"] = choice
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # response.completed always carries usage
    ignored += [name for name in _IGNORED if body.get(name) is not None]
    unmapped += [name for name in _UNMAPPED if body.get(name)]
    ignored += sorted(name for name in body if name not in PARAMS)
    return ChatRequest(chat, tuple(ignored), tuple(unmapped), instructions=instructions)


def _input_messages(items: list[dict[str, Any]], ignored: list[str], unmapped: list[str]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        path = f"input[{i}]"
        if kind == "message":
            messages.append({"role": item["role"], "content": _content(item["content"], f"{path}.content", unmapped)})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # parallel calls, or text then calls: one turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _content(item["output"], f"{path}.output", unmapped)
            if isinstance(output, list) and any(p["type"] != "text" for p in output):
                unmapped.append(f"{path}.output")  # a chat tool message carries text only
                output = [p for p in output if p["type"] == "text"]
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            ignored.append(path)
        else:
            unmapped.append(path)
    return messages


def _content(content: str | list[dict[str, Any]], path: str, unmapped: list[str]) -> str | list[dict[str, Any]]:
    """Responses content parts as chat parts; a lone text part becomes a plain string."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal", "")})
        elif kind == "input_image" and part.get("image_url"):
            image = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and (part.get("file_data") or part.get("file_id")):
            parts.append({"type": "file", "file": {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k)}})
        else:
            unmapped.append(f"{path}[{j}]")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tools(tools: list[dict[str, Any]], unmapped: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            unmapped.append(f"tools[{i}]")
            continue
        fn = {"name": tool["name"]}
        fn.update({k: tool[k] for k in ("description", "parameters", "strict") if tool.get(k) is not None})
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any] | None:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    return None  # hosted tools, allowed_tools, mcp: not expressible as a chat tool_choice here


def should_store(body: dict[str, Any]) -> bool:
    """Whether the response is stored for ``GET`` and ``previous_response_id`` (``store`` defaults to true)."""
    return body.get("store") is not False


# -- chat -> response -------------------------------------------------------------------------

def from_chat(chat_response: dict[str, Any], request: dict[str, Any], *, response_id: str, created: int) -> dict[str, Any]:
    """A chat completion (teacher's or student's; ``usage`` may be absent) as a Responses object."""
    message, finish, _ = first_choice(chat_response)
    status, incomplete = _status(finish)
    base = _id_base(response_id)
    output: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    text, refusal = message.get("content"), message.get("refusal")
    if text or refusal or not calls:
        parts = [_output_text(text or "")] if text or not refusal else []
        if refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        output.append(_message_item(f"msg_{base}_0", parts, "incomplete" if status == "incomplete" else "completed"))
    for call in calls:
        fn = call.get("function") or {}
        at = len(output)
        output.append(_call_item(f"fc_{base}_{at}", call.get("id") or f"call_{base}_{at}", fn.get("name") or "",
                                 fn.get("arguments") or "", "completed"))
    model = chat_response.get("model") or request["model"]
    return _response(request, response_id=response_id, created=created, model=model, status=status,
                     output=output, usage=_usage(chat_response.get("usage")), incomplete=incomplete)


def _status(finish: str | None) -> tuple[str, dict[str, str] | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _id_base(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    counts = token_counts(usage)
    if counts is None:
        return None
    prompt, completion, cached, reasoning = counts
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def _response(request: dict[str, Any], *, response_id: str, created: int, model: str, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None, incomplete: dict[str, str] | None = None,
              error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full response object: the request's settings echoed as OpenAI echoes them."""
    text = request.get("text") or {}
    reasoning = request.get("reasoning") or {}
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status,
        "background": False, "error": error, "incomplete_details": incomplete,
        "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"), "model": model, "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": request.get("service_tier", "default"), "store": should_store(request),
        "temperature": request.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity", "medium")},
        "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
        "top_logprobs": request.get("top_logprobs", 0), "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation", "disabled"), "usage": usage, "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def conversation_after(chat_request: ChatRequest, chat_response: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a follow-up (``previous_response_id``) continues from: this request's
    messages without its instructions (OpenAI does not carry instructions over), then the answer."""
    message, _, _ = first_choice(chat_response)
    answer: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        answer["content"] = answer["content"] or None  # a stream's empty role chunk leaves ""
        answer["tool_calls"] = [
            {"id": c.get("id"), "type": "function", "function": c.get("function") or {}} for c in message["tool_calls"]
        ]
    return chat_request.body["messages"][chat_request.instructions:] + [answer]


# -- streaming --------------------------------------------------------------------------------

class ResponsesStream:
    """Chat chunks in, Responses SSE events out (``event:`` lines, ``sequence_number`` from 0).

    ``start()`` sends response.created and response.in_progress (``feed`` does so on first use);
    ``feed(chunk)`` the output items' events; ``finish()`` closes the open item and sends
    response.completed (response.incomplete when the answer was cut short); ``error(exc)`` sends an
    ``error`` event and response.failed. ``response`` then holds the final object, for the store.
    """

    def __init__(self, request: dict[str, Any], *, response_id: str, created: int):
        self.request = request
        self.response_id = response_id
        self.created = created
        self.response: dict[str, Any] | None = None
        self._reader = ChatStreamReader()
        self._base = _id_base(response_id)
        self._sequence = 0
        self._started = False

    def start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        skeleton = self._snapshot("in_progress", [])
        return [self._event("response.created", response=skeleton), self._event("response.in_progress", response=skeleton)]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out = self.start()
        for step in self._reader.feed(chunk):
            out += self._step(step)
        return out

    def finish(self) -> list[bytes]:
        out = self.start()
        status, incomplete = _status(self._reader.finish_reason)
        last = "incomplete" if status == "incomplete" else "completed"  # the item that was cut short
        for step in self._reader.close():
            out += self._step(step, item_status=last)
        blocks = self._reader.blocks
        items = [self._item(b, last if b is blocks[-1] else "completed") for b in blocks]
        self.response = self._snapshot(status, items, incomplete=incomplete, usage=_usage(self._reader.usage))
        name = "response.completed" if status == "completed" else "response.incomplete"
        return out + [self._event(name, response=self.response)]

    def error(self, exc: GatewayError) -> list[bytes]:
        """The in-band failure once the status line is gone: ``error``, then response.failed."""
        out = self.start()
        code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
        out.append(self._event("error", code=exc.code or code, message=exc.message, param=exc.param))
        self.response = self._snapshot("failed", [self._item(b, "incomplete") for b in self._reader.blocks],
                                       error={"code": code, "message": exc.message})
        return out + [self._event("response.failed", response=self.response)]

    def _snapshot(self, status: str, output: list[dict[str, Any]], *, usage: dict[str, Any] | None = None,
                  incomplete: dict[str, str] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        model = self._reader.model or self.request["model"]
        return _response(self.request, response_id=self.response_id, created=self.created, model=model, status=status,
                         output=output, usage=usage, incomplete=incomplete, error=error)

    def _event(self, kind: str, **payload: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._sequence, **payload}
        self._sequence += 1
        return event(kind, body)

    def _item_id(self, block: Block) -> str:
        return f"{'msg' if block.kind == 'text' else 'fc'}_{self._base}_{block.position}"

    def _item(self, block: Block, status: str) -> dict[str, Any]:
        if block.kind == "text":
            return _message_item(self._item_id(block), [_output_text(block.text)], status)
        return _call_item(self._item_id(block), block.call_id or f"call_{self._base}_{block.position}",
                          block.name, block.text, status)

    def _step(self, step: Step, *, item_status: str = "completed") -> list[bytes]:
        kind, block, fragment = step
        index = block.position
        where = {"item_id": self._item_id(block), "output_index": index}
        if kind == "open":
            started = self._item(block, "in_progress")
            if block.kind == "text":
                started["content"] = []
                return [self._event("response.output_item.added", output_index=index, item=started),
                        self._event("response.content_part.added", **where, content_index=0, part=_output_text(""))]
            started["arguments"] = ""
            return [self._event("response.output_item.added", output_index=index, item=started)]
        if kind == "delta":
            if block.kind == "text":
                return [self._event("response.output_text.delta", **where, content_index=0, delta=fragment, logprobs=[])]
            return [self._event("response.function_call_arguments.delta", **where, delta=fragment)]
        done = self._item(block, item_status)
        if block.kind == "text":
            return [self._event("response.output_text.done", **where, content_index=0, text=block.text, logprobs=[]),
                    self._event("response.content_part.done", **where, content_index=0, part=_output_text(block.text)),
                    self._event("response.output_item.done", output_index=index, item=done)]
        return [self._event("response.function_call_arguments.done", **where, name=block.name, arguments=block.text),
                self._event("response.output_item.done", output_index=index, item=done)]


# -- native Responses answers (an OpenAI teacher called on this surface directly) ---------------

def usage_of(response: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt_tokens, completion_tokens, cached_tokens) of a Responses object, for pricing."""
    usage = response.get("usage") or {}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0), int(cached)


def answer_text(response: dict[str, Any]) -> str:
    """The answer's text, as the SDK's ``output_text``: every output_text part, joined."""
    return "".join(
        part.get("text") or ""
        for item in response.get("output") or [] if item.get("type") == "message"
        for part in item.get("content") or [] if part.get("type") == "output_text"
    )


def from_native_to_chat(response: dict[str, Any]) -> dict[str, Any]:
    """A native Responses object as a chat completion, so the ledger logs one form."""
    calls = [
        {"id": item.get("call_id"), "type": "function",
         "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
        for item in response.get("output") or [] if item.get("type") == "function_call"
    ]
    text = answer_text(response)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    reason = (response.get("incomplete_details") or {}).get("reason")
    finish = {"max_output_tokens": "length", "content_filter": "content_filter"}.get(reason or "")
    finish = finish or ("tool_calls" if calls else "stop")
    chat: dict[str, Any] = {
        "id": response.get("id"), "object": "chat.completion", "created": int(response.get("created_at") or 0),
        "model": response.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": None,
    }
    if response.get("usage"):
        prompt, completion, cached = usage_of(response)
        reasoning = (response["usage"].get("output_tokens_details") or {}).get("reasoning_tokens") or 0
        chat["usage"] = {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    return chat


def assemble_native_stream(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The final response of a native Responses stream (its parsed events' data, in order): the
    response of the last completed, incomplete or failed event; None if the stream never got there."""
    for ev in reversed(events):
        if ev.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            return ev.get("response")
    return None
