"""What every surface's handlers share: the gateway's state, the caller, the JSON body, the reply."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from gateway.auth import Principal
from gateway.errors import BodyTooLarge, GatewayError, UnsupportedMediaType
from gateway.protocol import parse_json_body
from gateway.serving import Reply, new_uid

__all__ = ["state_of", "principal_of", "read_json", "read_body", "check_json_content_type", "kdgate_headers",
           "render", "json_response", "json_body_schema"]


def state_of(request: Request) -> Any:
    return request.app.state.kdgate


def principal_of(request: Request) -> Principal:
    """The caller, by ``Authorization: Bearer`` or (Anthropic's SDKs) ``x-api-key``."""
    authorization = request.headers.get("authorization")
    if authorization is None and request.headers.get("x-api-key") is not None:
        authorization = "Bearer " + request.headers["x-api-key"]
    return state_of(request).keys.gateway_principal(authorization)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it as soon as it passes ``limit`` bytes (chunked bodies included)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is {declared} bytes; the limit is {limit} (max_body_bytes).")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is over the limit of {limit} bytes (max_body_bytes).")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_content_type(request: Request, *, auth: bool) -> None:
    """JSON endpoints take JSON. A browser can send ``text/plain`` (or no type, from a Blob) to any
    site without asking first; ``application/json`` needs a CORS preflight, which the gateway never
    grants. Without auth a missing type is refused too, so no other web page can call the gateway."""
    kind = request.headers.get("content-type")
    if kind is None:
        if auth:
            return
        raise UnsupportedMediaType(
            "The request has no Content-Type; send the body as application/json.", param="content-type")
    media = kind.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    shown = "".join(ch if ch.isprintable() else "?" for ch in media[:80])
    raise UnsupportedMediaType(f"Content-Type {shown!r} is not supported; send the body as application/json.",
                               param="content-type")


async def read_json(request: Request, principal: Principal, endpoint: str) -> dict[str, Any]:
    """The request's JSON body; an unreadable one is refused and logged as a failed exchange."""
    state = state_of(request)
    t0 = time.perf_counter()
    try:
        check_json_content_type(request, auth=state.settings.auth)
        return parse_json_body(await read_body(request, state.settings.max_body_bytes))
    except GatewayError as exc:
        state.chat._log_failure(uid=new_uid(), ts=time.time(), t0=t0, route=None, body=None, principal=principal,
                                exc=exc, endpoint=endpoint)
        raise


def kdgate_headers(request: Request) -> dict[str, str]:
    """The request's ``x-kdgate-*`` headers (route, escalation), lower-cased."""
    return {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-kdgate-")}


def render(reply: Reply) -> Response:
    if reply.stream is not None:
        return StreamingResponse(
            reply.stream,
            status_code=reply.status,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **reply.headers},
        )
    return Response(reply.body, status_code=reply.status, media_type="application/json", headers=reply.headers)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def json_body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a handler that reads its JSON body itself (documented in /openapi.json)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
