"""The gateway's errors, each carrying its HTTP status and OpenAI error type.

    GatewayError                      500 api_error (never raised on purpose: a bug)
    ├── BadRequest                    400 invalid_request_error
    │   ├── BodyTooLarge              413 invalid_request_error
    │   ├── UnsupportedMediaType      415 invalid_request_error (a JSON endpoint got another content type)
    │   ├── UnknownRoute              404 invalid_request_error (code route_not_found)
    │   └── ModelNotFound             404 invalid_request_error (code model_not_found)
    ├── AuthenticationFailed          401 authentication_error (code invalid_api_key)
    ├── PermissionDenied              403 permission_error
    │   └── RouteNotAllowed           403 permission_error (the key's scope does not include the route)
    ├── NotFound                      404 invalid_request_error
    └── UpstreamError                 502 api_error: the teacher failed
        ├── UpstreamTimeout           504 timeout
        ├── UpstreamRateLimited       429 rate_limit_exceeded (retry-after passed on)
        └── UpstreamStatus            the teacher's own 4xx/5xx status, its message passed on

Every error is rendered by one handler as OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``. Messages never contain credentials.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GatewayError",
    "BadRequest",
    "BodyTooLarge",
    "UnknownRoute",
    "ModelNotFound",
    "UnsupportedMediaType",
    "AuthenticationFailed",
    "PermissionDenied",
    "RouteNotAllowed",
    "NotFound",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamRateLimited",
    "UpstreamStatus",
    "error_body",
]


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(BadRequest):
    status = 413
    code = "request_too_large"


class UnknownRoute(BadRequest):
    status = 404
    code = "route_not_found"


class ModelNotFound(BadRequest):
    """The requested model is neither a route, an alias nor a configured teacher (OpenAI's 404)."""

    status = 404
    code = "model_not_found"


class UnsupportedMediaType(BadRequest):
    status = 415
    code = "unsupported_media_type"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class RouteNotAllowed(PermissionDenied):
    code = "route_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UpstreamError(GatewayError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class UpstreamStatus(UpstreamError):
    """The teacher answered with an error status; we pass status and message on."""


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
