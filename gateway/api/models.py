"""The models a client may ask for."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.common import json_response, principal_of, state_of

router = APIRouter(tags=["openai"])


def _model(name: str, owner: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """The configured teachers (by their bare names), the configured routes and their aliases."""
    principal_of(request)
    names = state_of(request).routes.model_names()
    return json_response(200, {"object": "list", "data": [_model(n, o) for n, o in names.items()]})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Response:
    """One model clients may ask for; 404 ``model_not_found`` for any other."""
    principal_of(request)
    routes = state_of(request).routes
    owner = routes.model_names().get(model_id)
    if owner is None:
        teacher = routes.teacher_for(model_id)  # raises model_not_found for a model nobody configured
        owner = teacher.split("/", 1)[0] if "/" in teacher else "openai"
    return json_response(200, _model(model_id, owner))
