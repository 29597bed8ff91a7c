"""OpenAI's chat completions and embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.common import json_body_schema, kdgate_headers, principal_of, read_json, render, state_of
from gateway.protocol import CHAT_SCHEMA

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", openapi_extra=json_body_schema(CHAT_SCHEMA))
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions (streaming and not), answered by a student or the teacher."""
    state = state_of(request)
    principal = principal_of(request)
    body = await read_json(request, principal, "chat.completions")
    return render(await state.chat.chat(body, principal=principal, headers=kdgate_headers(request)))


@router.post("/v1/embeddings", openapi_extra=json_body_schema({"type": "object", "required": ["model", "input"]}))
async def embeddings(request: Request) -> Response:
    """OpenAI's embeddings, passed through to the provider and logged for cost."""
    state = state_of(request)
    principal = principal_of(request)
    body = await read_json(request, principal, "embeddings")
    return render(await state.chat.embeddings(body, principal=principal, headers=kdgate_headers(request)))
