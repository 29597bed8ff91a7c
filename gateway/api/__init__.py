"""The model endpoints, one router module per surface (the web layer only: each handler reads the
request, calls the framework-free service in :mod:`gateway.serving` / :mod:`gateway.surface_serving`
and renders its :class:`~gateway.serving.Reply`).

    module        paths
    chat          POST /v1/chat/completions, POST /v1/embeddings
    responses     POST /v1/responses, GET and DELETE /v1/responses/{id}
    messages      POST /v1/messages, POST /v1/messages/count_tokens (Anthropic's format and errors)
    completions   POST /v1/completions
    models        GET /v1/models, GET /v1/models/{id}
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["build_api_router"]


def build_api_router() -> APIRouter:
    from gateway.api import chat, completions, messages, models, responses

    router = APIRouter()
    for module in (chat, responses, messages, completions, models):
        router.include_router(module.router)
    return router
