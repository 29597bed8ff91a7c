"""OpenAI's legacy text completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.common import json_body_schema, kdgate_headers, principal_of, read_json, render, state_of

router = APIRouter(tags=["openai"])

COMPLETIONS_SCHEMA = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string"},
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "max_tokens": {"type": "integer"},
        "stream": {"type": "boolean"},
        "temperature": {"type": "number"},
    },
}


@router.post("/v1/completions", openapi_extra=json_body_schema(COMPLETIONS_SCHEMA))
async def create_completion(request: Request) -> Response:
    """A text completion: passed to a teacher that has the endpoint, otherwise answered as one chat turn."""
    state = state_of(request)
    principal = principal_of(request)
    body = await read_json(request, principal, "completions")
    return render(await state.surfaces.completions(body, principal=principal, headers=kdgate_headers(request)))
