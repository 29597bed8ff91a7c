"""The client surfaces besides chat completions, as pure protocol code (no I/O, no web framework).

Every surface's request is normalised to ONE chat-completions body, so a task lands on one route
whatever door it came through, and that route's student (which answers in chat form) can answer on
every surface. Each module has the same parts:

    PARAMS                    the surface's documented request fields (for gateway.params.ParamPolicy)
    validate(body)            what the surface itself would refuse, as BadRequest naming the param
    to_chat(body)             -> ChatRequest: the chat body, and what it does not carry
    from_chat(chat, request, *, response_id, created)   a chat completion in the surface's shape
    <Surface>Stream           chat chunks in, the surface's SSE bytes out (feed, finish, error)

    module         surface                          stream class
    responses      OpenAI Responses (/v1/responses) ResponsesStream
    messages       Anthropic Messages (/v1/messages) MessagesStream
    completions    legacy completions (/v1/completions) CompletionsStream
    sse            SSE framing and ChatStreamReader, shared by the stream classes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.errors import BadRequest
from gateway.params import is_provider_option

__all__ = ["ChatRequest", "first_choice", "token_counts", "check_range", "check_type", "refuse_provider_options"]


@dataclass(frozen=True)
class ChatRequest:
    """A surface's request as one chat-completions body, and what that body leaves out.

    ``ignored``: fields (named as the surface names them) left out that do not change what the
    answer says: caching and storage hints, service tiers, reasoning items handed back. Report them
    (``header()``) as the chat surface reports dropped fields.

    ``unmapped``: fields the chat form cannot carry and that would change the answer (hosted tools,
    file ids, stored prompts, suffix insertion). A native teacher of the surface can still serve the
    request; a chat teacher or a student cannot: call ``require_chat()`` before serving it as chat.

    ``instructions``: how many leading messages came from the request's own instructions (Responses),
    which a follow-up with ``previous_response_id`` does not inherit.
    """

    body: dict[str, Any]
    ignored: tuple[str, ...] = ()
    unmapped: tuple[str, ...] = ()
    instructions: int = field(default=0)

    def header(self) -> dict[str, str]:
        """``x-kdgate-ignored-params`` naming what was left out, when anything was."""
        names = self.ignored + self.unmapped
        return {"x-kdgate-ignored-params": ",".join(names[:32])} if names else {}

    def require_chat(self) -> None:
        """Refuse a request that a chat teacher or student cannot answer faithfully."""
        if self.unmapped:
            name = self.unmapped[0]
            raise BadRequest(
                f"{name}: not supported here; kdgate answers this request through a chat-completions "
                "model, which cannot carry it. Leave it out, or route the request to a teacher that "
                "speaks this API natively.",
                param=name, code="unsupported_parameter",
            )


def first_choice(chat_response: dict[str, Any]) -> tuple[dict[str, Any], str | None, Any]:
    """(message, finish_reason, stop_reason) of a chat completion's first choice; stop_reason is
    vLLM's matched stop string or token, when the producer says it."""
    choices = chat_response.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    return choice.get("message") or {}, choice.get("finish_reason"), choice.get("stop_reason")


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cached, reasoning) tokens of a chat ``usage``; None when there is none."""
    if not usage:
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(prompt_details.get("cached_tokens") or 0),
        int(completion_details.get("reasoning_tokens") or 0),
    )


# -- validation helpers: each error names the parameter first, the way every surface does --------

def check_type(body: dict[str, Any], name: str, types: type | tuple[type, ...], what: str, *, path: str | None = None) -> None:
    """Refuse ``body[name]`` unless it is absent, null or of ``types`` (booleans are not numbers)."""
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        where = path or name
        raise BadRequest(f"{where}: must be {what}; got {_short(value)}.", param=where)


def check_range(body: dict[str, Any], name: str, lo: float, hi: float, *, integer: bool = False, path: str | None = None) -> None:
    """Refuse ``body[name]`` unless it is absent, null or a number (an integer) in [lo, hi]."""
    value = body.get(name)
    if value is None:
        return
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        where = path or name
        what = "an integer" if integer else "a number"
        raise BadRequest(f"{where}: must be {what} between {lo} and {hi}; got {_short(value)}.", param=where)


def refuse_provider_options(body: dict[str, Any]) -> None:
    """Refuse credentials, endpoints and litellm switches at the top level (see gateway.params)."""
    for name in body:
        if isinstance(name, str) and is_provider_option(name):
            shown = "".join(ch if ch.isprintable() else "?" for ch in name[:64])
            raise BadRequest(
                f"{shown}: unrecognized request argument. Provider options (credentials, endpoints, "
                "litellm switches) are the gateway operator's, never the client's.",
                param=shown, code="unsupported_parameter",
            )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
