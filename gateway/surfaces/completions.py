"""OpenAI's legacy completions (``POST /v1/completions``) over chat completions.

The prompt becomes ONE user message. A student, or a teacher that only speaks chat, then answers it
as a chat turn: it replies to the prompt rather than continuing its text, which is what a client of
an instruction-tuned completions model expects, and not what a base model would do.

    completions                     chat completions
    prompt (string, or [string])    one user message (several prompts, or token ids: refused)
    max_tokens (default 16)         max_tokens: 16 when absent, OpenAI's completions default
    temperature, top_p, n, stop,    the same
      presence/frequency_penalty,
      logit_bias, seed, user,
      stream (+ stream_options)     (the usage chunk is always asked for, and passed on when the
                                    client asked for it)
    logprobs k                      logprobs: true, top_logprobs: k; the answer's token logprobs
                                    come back as tokens / token_logprobs / top_logprobs / text_offset
    echo                            the prompt is put before each choice's text
    best_of = n (or 1)              consumed
    suffix, best_of > n,            unmapped: a chat model cannot insert text or rank candidates,
      echo with logprobs, max_tokens 0  nor score the prompt's own tokens

Chat completion -> text_completion (:func:`from_chat`): each choice's message content is its
``text``; finish ``length`` and ``content_filter`` kept, anything else ``stop``; usage as is.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import BadRequest, GatewayError
from gateway.surfaces import (
    ChatRequest,
    check_range,
    check_type,
    refuse_provider_options,
)
from gateway.surfaces.sse import DONE, data

__all__ = ["PARAMS", "DEFAULT_MAX_TOKENS", "validate", "prompt_text", "to_chat", "from_chat", "CompletionsStream",
           "from_native_to_chat", "assemble_native_stream"]

# OpenAI's documented request fields (https://platform.openai.com/docs/api-reference/completions/create).
PARAMS: frozenset[str] = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
})
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint

_COPIED = ("temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user")


def validate(body: dict[str, Any]) -> None:
    """Refuse what the completions endpoint itself refuses, naming the param as OpenAI does."""
    refuse_provider_options(body)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: you must provide a model parameter.", param="model")
    prompt = body.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(p, (str, int)) and not isinstance(p, bool) or isinstance(p, list) for p in prompt))):
        raise BadRequest("prompt: must be a string, an array of strings, or an array of token arrays.", param="prompt")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise BadRequest("stop: must be a string or an array of at most 4 strings.", param="stop")
    check_range(body, "max_tokens", 0, 1_000_000, integer=True)
    check_range(body, "n", 1, 128, integer=True)
    check_range(body, "best_of", 1, 20, integer=True)
    check_range(body, "logprobs", 0, 5, integer=True)
    check_range(body, "temperature", 0, 2)
    check_range(body, "top_p", 0, 1)
    check_range(body, "presence_penalty", -2, 2)
    check_range(body, "frequency_penalty", -2, 2)
    check_range(body, "seed", -(2**63), 2**63 - 1, integer=True)
    for name in ("echo", "stream"):
        check_type(body, name, bool, "a boolean")
    for name in ("suffix", "user"):
        check_type(body, name, str, "a string")
    for name in ("logit_bias", "stream_options"):
        check_type(body, name, dict, "an object")
    if body.get("best_of") is not None and body["best_of"] < (body.get("n") or 1):
        raise BadRequest("best_of: must be greater than or equal to n.", param="best_of")


def prompt_text(body: dict[str, Any]) -> str:
    """The request's one text prompt; several prompts or token ids are refused (a chat model takes one text)."""
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise BadRequest(
                "prompt: kdgate answers one text prompt per request (it is answered as a chat turn); "
                "send several prompts as separate requests, and text rather than token ids.",
                param="prompt", code="unsupported_parameter",
            )
        prompt = prompt[0]
    return prompt


def to_chat(body: dict[str, Any]) -> ChatRequest:
    """The request as one chat body: the prompt as a user message (see the module's table)."""
    unmapped: list[str] = []
    chat: dict[str, Any] = {"model": body["model"], "messages": [{"role": "user", "content": prompt_text(body)}]}
    for name in _COPIED:
        if body.get(name) is not None:
            chat[name] = body[name]
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens == 0:
        unmapped.append("max_tokens")  # scoring the prompt alone
    elif max_tokens is not None:
        chat["max_tokens"] = max_tokens
    if body.get("logprobs") is not None:
        chat["logprobs"] = True
        chat["top_logprobs"] = body["logprobs"]
        if body.get("echo"):
            unmapped.append("echo")  # the prompt's own token logprobs
    if body.get("suffix"):
        unmapped.append("suffix")
    if (body.get("best_of") or 1) > (body.get("n") or 1):
        unmapped.append("best_of")
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    ignored = tuple(sorted(name for name in body if name not in PARAMS))
    return ChatRequest(chat, ignored, tuple(unmapped))


def from_chat(chat_response: dict[str, Any], request: dict[str, Any], *, response_id: str, created: int) -> dict[str, Any]:
    """A chat completion (teacher's or student's; ``usage`` may be absent) as a ``text_completion``."""
    prefix = prompt_text(request) if request.get("echo") else ""
    choices = []
    for i, choice in enumerate(chat_response.get("choices") or []):
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message.get("content"), str) else ""
        logprobs = _logprobs(choice.get("logprobs"), offset=len(prefix)) if request.get("logprobs") is not None else None
        choices.append({"text": prefix + text, "index": choice.get("index", i), "logprobs": logprobs,
                        "finish_reason": _finish(choice.get("finish_reason"))})
    usage = chat_response.get("usage")  # the same shape on both surfaces
    return {
        "id": response_id, "object": "text_completion", "created": created,
        "model": chat_response.get("model") or request["model"],
        "system_fingerprint": chat_response.get("system_fingerprint"), "choices": choices,
        "usage": usage or None,
    }


def _finish(reason: str | None) -> str:
    return reason if reason in ("length", "content_filter") else "stop"


def _logprobs(chat_logprobs: dict[str, Any] | None, *, offset: int) -> dict[str, Any] | None:
    """Chat's per-token logprobs in the completions layout (text offsets count characters)."""
    tokens = (chat_logprobs or {}).get("content")
    if tokens is None:
        return None
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token in tokens:
        out["tokens"].append(token.get("token", ""))
        out["token_logprobs"].append(token.get("logprob"))
        out["top_logprobs"].append({t.get("token", ""): t.get("logprob") for t in token.get("top_logprobs") or []})
        out["text_offset"].append(offset)
        offset += len(token.get("token", ""))
    return out


class CompletionsStream:
    """Chat chunks in, ``text_completion`` chunks out (``data:`` lines only, then ``[DONE]``).

    ``feed`` turns each chat chunk into one completions chunk (the role-only chunk into nothing);
    the usage chunk is passed on only when the client asked (``stream_options.include_usage``);
    ``finish()`` sends ``[DONE]``; ``error(exc)`` sends OpenAI's error envelope in-band, as the
    chat surface does.
    """

    def __init__(self, request: dict[str, Any], *, response_id: str, created: int):
        self.request = request
        self.response_id = response_id
        self.created = created
        self._prefix = prompt_text(request) if request.get("echo") else ""
        self._offsets: dict[int, int] = {}  # per choice: characters sent so far (the next text_offset)
        self._wants_usage = bool((request.get("stream_options") or {}).get("include_usage"))

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        head = {"id": self.response_id, "object": "text_completion", "created": self.created,
                "model": chunk.get("model") or self.request["model"]}
        choices = []
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            answered = (choice.get("delta") or {}).get("content") or ""
            first = index not in self._offsets
            start = self._offsets.get(index, 0)
            text = (self._prefix if first else "") + answered
            self._offsets[index] = start + len(text)
            finish = choice.get("finish_reason")
            if not text and not finish:
                continue
            logprobs = None
            if self.request.get("logprobs") is not None:
                logprobs = _logprobs(choice.get("logprobs"), offset=start + len(text) - len(answered))
            choices.append({"text": text, "index": index, "logprobs": logprobs,
                            "finish_reason": _finish(finish) if finish else None})
        out = [data({**head, "choices": choices})] if choices else []
        usage = chunk.get("usage")
        if usage and self._wants_usage:
            out.append(data({**head, "choices": [], "usage": usage}))
        return out

    def finish(self) -> list[bytes]:
        return [DONE]

    def error(self, exc: GatewayError) -> list[bytes]:
        return [data(exc.body())]


# -- native completions answers (a teacher that has /v1/completions, called on it directly) ------

def from_native_to_chat(completion: dict[str, Any]) -> dict[str, Any]:
    """A native ``text_completion`` as a chat completion, so the ledger logs one form."""
    choices = [
        {"index": c.get("index", i), "message": {"role": "assistant", "content": c.get("text") or ""},
         "finish_reason": c.get("finish_reason") or "stop", "logprobs": None}
        for i, c in enumerate(completion.get("choices") or [])
    ]
    return {"id": completion.get("id"), "object": "chat.completion", "created": completion.get("created") or 0,
            "model": completion.get("model"), "choices": choices, "usage": completion.get("usage")}


def assemble_native_stream(chunks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``text_completion`` a native completions stream amounts to (its chunks, in order);
    None when it held none."""
    if not chunks:
        return None
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            texts.setdefault(index, []).append(choice.get("text") or "")
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
        usage = chunk.get("usage") or usage
    head = chunks[0]
    choices = [{"index": i, "text": "".join(t), "finish_reason": finish.get(i), "logprobs": None} for i, t in sorted(texts.items())]
    return {"id": head.get("id"), "object": "text_completion", "created": head.get("created"), "model": head.get("model"),
            "choices": choices, "usage": usage}
