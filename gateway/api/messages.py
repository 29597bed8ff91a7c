"""Anthropic's Messages API. Every error on these paths is in Anthropic's shape (see gateway.app)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.common import json_body_schema, kdgate_headers, principal_of, read_json, render, state_of

router = APIRouter(tags=["anthropic"])

MESSAGES_SCHEMA = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": {"type": "object"}},
        "max_tokens": {"type": "integer"},
        "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "stream": {"type": "boolean"},
        "temperature": {"type": "number"},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
}
COUNT_SCHEMA = {k: v for k, v in MESSAGES_SCHEMA.items() if k != "required"} | {"required": ["model", "messages"]}


@router.post("/v1/messages", openapi_extra=json_body_schema(MESSAGES_SCHEMA))
async def create_message(request: Request) -> Response:
    """A message (``system``, content blocks, tools and ``tool_use``/``tool_result``), answered by a
    student or the teacher; Anthropic's SSE events with ``stream: true``. Auth: ``x-api-key`` or Bearer."""
    state = state_of(request)
    principal = principal_of(request)
    body = await read_json(request, principal, "messages")
    return render(await state.surfaces.messages(body, principal=principal, headers=kdgate_headers(request)))


@router.post("/v1/messages/count_tokens", openapi_extra=json_body_schema(COUNT_SCHEMA))
async def count_tokens(request: Request) -> Response:
    """The request's input tokens, as the gateway estimates them (no model is called)."""
    state = state_of(request)
    principal = principal_of(request)
    body = await read_json(request, principal, "messages.count_tokens")
    return render(state.surfaces.count_tokens(body))
