"""OpenAI's Responses API: create (plain and streamed), retrieve and delete stored responses."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.common import json_body_schema, kdgate_headers, principal_of, read_json, render, state_of

router = APIRouter(tags=["openai"])

RESPONSES_SCHEMA = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "instructions": {"type": "string"},
        "previous_response_id": {"type": "string"},
        "store": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "max_output_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "text": {"type": "object"},
    },
}


@router.post("/v1/responses", openapi_extra=json_body_schema(RESPONSES_SCHEMA))
async def create_response(request: Request) -> Response:
    """A model response (``instructions``, string or item ``input``, ``previous_response_id``, function
    tools, ``text.format``), answered by a student or the teacher; SSE with ``stream: true``."""
    state = state_of(request)
    principal = principal_of(request)
    body = await read_json(request, principal, "responses")
    return render(await state.surfaces.responses(body, principal=principal, headers=kdgate_headers(request)))


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> Response:
    """A stored response (``store`` was not false), for the key that created it."""
    principal = principal_of(request)
    return render(await state_of(request).surfaces.stored_response(response_id, principal=principal))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    """Delete a stored response of this key."""
    principal = principal_of(request)
    return render(await state_of(request).surfaces.delete_response(response_id, principal=principal))
