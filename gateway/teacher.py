"""Calls to the teacher model.

OpenAI-compatible upstreams (``openai/...``, ``hosted_vllm/...``, any model with an ``api_base``) are
called over HTTP directly with a pooled aiohttp session: litellm's SDK costs about 3 ms a call, more
than the whole budget of the gateway's hot path, and these upstreams need no translation. Every other
provider (``anthropic/...``, ``azure/...``, ``bedrock/...``) goes through ``litellm.acompletion``,
which translates to and from OpenAI's format. Both paths retry 429/5xx/connection errors with
exponential backoff and jitter inside the request's deadline, and raise :mod:`gateway.errors` types.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.money import load_litellm
from gateway.params import is_provider_option
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStatus,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

__all__ = ["TeacherClient", "TeacherTarget", "TeacherResponse", "TeacherStream", "CircuitBreaker", "TeacherUnavailable",
           "NATIVE_PATHS", "sse_data"]


class TeacherUnavailable(UpstreamError):
    """The teacher endpoint's circuit is open: it failed repeatedly and is left alone for a while."""

    status = 503
    code = "teacher_unavailable"


class CircuitBreaker:
    """Per teacher endpoint: after ``failures`` failed calls in a row, calls fail fast for ``reset_s``;
    then one probe is let through (half-open) and its outcome closes or re-opens the circuit."""

    def __init__(self, *, failures: int = 5, reset_s: float = 30.0):
        self.threshold = failures
        self.reset_s = reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.reset_s else "open"

    def retry_after(self) -> int:
        """Whole seconds until the circuit lets a probe through (at least 1)."""
        if self.opened_at is None:
            return 1
        return max(1, math.ceil(self.reset_s - (time.monotonic() - self.opened_at)))

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


def _is_outage(exc: GatewayError) -> bool:
    """Failures that say the endpoint is down (not that this request was wrong)."""
    return exc.status >= 500 or exc.status in (408, 429)

# Providers that speak OpenAI's wire format as they are, and their default base URL and key variable.
_DIRECT_PROVIDERS: dict[str, tuple[str | None, str]] = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "hosted_vllm": (None, "HOSTED_VLLM_API_KEY"),
    "openai_like": (None, "OPENAI_LIKE_API_KEY"),
}
_RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}

# The surfaces a provider speaks natively besides chat completions, and the path of each. A request
# on one of these surfaces goes to such a teacher as it came (its allowed fields); every other
# teacher gets its chat form. An upstream that turns out not to have the path (404/405: an
# OpenAI-compatible server without /responses) is remembered and gets the chat form from then on.
NATIVE_PATHS: dict[str, dict[str, str]] = {
    "responses": {"openai": "/responses"},
    "completions": {"openai": "/completions", "hosted_vllm": "/completions", "openai_like": "/completions"},
    "messages": {"anthropic": "/messages"},
}
ANTHROPIC_VERSION = "2023-06-01"
_NATIVE_SHAPES = {"responses": ("output", "object"), "completions": ("choices",), "messages": ("content", "type")}


@dataclass(frozen=True)
class TeacherTarget:
    """Where a route's teacher lives: a litellm model string and, optionally, a base URL."""

    model: str
    api_base: str | None = None

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"

    @property
    def upstream_model(self) -> str:
        return self.model.split("/", 1)[1] if "/" in self.model else self.model


@dataclass
class TeacherResponse:
    body: dict[str, Any]
    raw: bytes | None = None  # the upstream's bytes, when they can be passed on unchanged
    headers: dict[str, str] = field(default_factory=dict)
    native: bool = False  # raw is the surface's own format and body its chat form (a native call)


class TeacherStream:
    """An open streaming answer: iterate for SSE event bytes; ``chunks`` keeps the parsed chunks."""

    def __init__(self, events: AsyncIterator[bytes], closer: Any = None):
        self._events = events
        self._closer = closer
        self.chunks: list[dict[str, Any]] = []
        self.first: bytes | None = None
        self.native = False  # the events are the request surface's own (not chat chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self.first is not None:
            first, self.first = self.first, None
            yield first
        async for event in self._events:
            yield event

    async def aclose(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            res = closer()
            if asyncio.iscoroutine(res):
                await res


class TeacherClient:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        direct_http: bool = True,
        breaker_failures: int = 5,
        breaker_reset_s: float = 30.0,
    ):
        self._api_key = api_key
        self.breaker_failures = breaker_failures
        self.breaker_reset_s = breaker_reset_s
        self.breakers: dict[tuple[str, str | None], CircuitBreaker] = {}
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.direct_http = direct_http
        self._session: aiohttp.ClientSession | None = None
        self._endpoints: dict[tuple[str, str | None, str], tuple[str, dict[str, str]]] = {}
        self._not_native: set[tuple[str, str | None, str]] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=1024, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- public ---------------------------------------------------------------------------
    def is_direct(self, target: TeacherTarget) -> bool:
        return self.direct_http and (target.provider in _DIRECT_PROVIDERS)

    def breaker(self, target: TeacherTarget) -> CircuitBreaker:
        key = (target.model if not self.is_direct(target) else target.provider, target.api_base)
        b = self.breakers.get(key)
        if b is None:
            b = self.breakers[key] = CircuitBreaker(failures=self.breaker_failures, reset_s=self.breaker_reset_s)
        return b

    async def _guarded(self, target: TeacherTarget, call: Any, deadline: float) -> Any:
        breaker = self.breaker(target)
        if not breaker.allow():
            wait = breaker.retry_after()
            raise TeacherUnavailable(
                f"The teacher {target.model} failed {breaker.failures} times in a row; "
                f"calls are paused for up to {breaker.reset_s:g}s (circuit breaker).",
                headers={"retry-after": str(wait)},
            )
        try:
            result = await self._retrying(call, deadline)
        except GatewayError as exc:
            if _is_outage(exc):
                breaker.failure()
            else:
                breaker.success()  # the endpoint answered; the request was the problem
            raise
        except BaseException:
            breaker._probing = False
            raise
        breaker.success()
        return result

    async def chat(self, target: TeacherTarget, body: dict[str, Any], *, deadline: float | None = None) -> TeacherResponse:
        """A non-streaming chat completion from the teacher."""
        deadline = deadline or time.monotonic() + self.timeout_s
        if self.is_direct(target):
            return await self._guarded(target, lambda: self._direct_json(target, "/chat/completions", body, deadline), deadline)
        return await self._guarded(target, lambda: self._litellm_chat(target, body, deadline), deadline)

    async def chat_stream(self, target: TeacherTarget, body: dict[str, Any], *, deadline: float | None = None) -> TeacherStream:
        """Open a streaming chat completion. Retries happen only before the first event."""
        deadline = deadline or time.monotonic() + self.timeout_s
        if self.is_direct(target):
            return await self._guarded(target, lambda: self._direct_stream(target, body, deadline), deadline)
        return await self._guarded(target, lambda: self._litellm_stream(target, body, deadline), deadline)

    # -- native surfaces (Responses, legacy completions, Anthropic Messages) ------------------
    def speaks(self, target: TeacherTarget, surface: str) -> bool:
        """Whether ``target`` is called natively on ``surface`` (not its chat form)."""
        return target.provider in NATIVE_PATHS.get(surface, {}) and (target.provider, target.api_base, surface) not in self._not_native

    def not_native(self, target: TeacherTarget, surface: str) -> None:
        """Remember that ``target``'s endpoint lacks ``surface`` (it answered 404/405 there)."""
        log.warning("teacher %s has no native %s endpoint; sending it the chat form from now on", target.model, surface)
        self._not_native.add((target.provider, target.api_base, surface))

    async def native(self, target: TeacherTarget, surface: str, body: dict[str, Any], *, deadline: float | None = None) -> TeacherResponse:
        """A non-streaming answer on ``surface`` itself; ``body`` is the surface's own (allowed) fields."""
        deadline = deadline or time.monotonic() + self.timeout_s
        path = NATIVE_PATHS[surface][target.provider]
        return await self._guarded(target, lambda: self._direct_json(target, path, body, deadline, shape=surface), deadline)

    async def native_stream(self, target: TeacherTarget, surface: str, body: dict[str, Any], *, deadline: float | None = None) -> TeacherStream:
        """A streaming answer on ``surface`` itself: its own SSE events, passed on as they come."""
        deadline = deadline or time.monotonic() + self.timeout_s
        path = NATIVE_PATHS[surface][target.provider]
        return await self._guarded(target, lambda: self._direct_stream(target, body, deadline, path=path), deadline)

    async def embeddings(self, target: TeacherTarget, body: dict[str, Any], *, deadline: float | None = None) -> TeacherResponse:
        deadline = deadline or time.monotonic() + self.timeout_s
        if self.is_direct(target):
            return await self._guarded(target, lambda: self._direct_json(target, "/embeddings", body, deadline), deadline)
        return await self._guarded(target, lambda: self._litellm_embeddings(target, body, deadline), deadline)

    # -- retry loop -----------------------------------------------------------------------
    async def _retrying(self, call: Any, deadline: float) -> Any:
        attempt = 0
        while True:
            try:
                return await call()
            except (UpstreamRateLimited, UpstreamStatus, UpstreamError) as exc:
                retryable = isinstance(exc, UpstreamRateLimited) or exc.status in _RETRY_STATUSES or type(exc) is UpstreamError
                if isinstance(exc, UpstreamTimeout) or not retryable or attempt >= self.retries:
                    raise
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                retry_after = exc.headers.get("retry-after")
                if retry_after:
                    try:
                        delay = max(delay, float(retry_after))
                    except ValueError:
                        pass
                if time.monotonic() + delay >= deadline:
                    raise
                attempt += 1
                log.info("teacher call failed (%s), retry %d in %.2fs", exc.status, attempt, delay)
                await asyncio.sleep(delay)

    # -- direct HTTP ----------------------------------------------------------------------
    def _url_and_headers(self, target: TeacherTarget, path: str) -> tuple[str, dict[str, str]]:
        """The URL and headers of a call to ``target`` (computed once per target and path: the base,
        the key and the credentials a URL carries do not change while the process runs)."""
        key = (target.provider, target.api_base, path)
        cached = self._endpoints.get(key)
        if cached is None:
            cached = self._endpoints[key] = self._endpoint(target, path)
        return cached[0], dict(cached[1])

    def _endpoint(self, target: TeacherTarget, path: str) -> tuple[str, dict[str, str]]:
        if target.provider == "anthropic":
            return self._anthropic_endpoint(target, path)
        default_base, key_var = _DIRECT_PROVIDERS.get(target.provider, (None, "OPENAI_API_KEY"))
        base = target.api_base or (os.environ.get("OPENAI_BASE_URL") if target.provider == "openai" else None) or default_base
        if not base:
            raise UpstreamError(
                f"The teacher {target.model!r} needs an api_base (set teacher_api_base for the route or gateway)."
            )
        headers = {"content-type": "application/json"}
        key = self._api_key or os.environ.get(key_var)
        base, basic = _split_credentials(base)
        if key:
            headers["authorization"] = f"Bearer {key}"
        elif basic:
            headers["authorization"] = basic  # a proxy in front of the teacher, by URL credentials
        return base.rstrip("/") + path, headers

    def _anthropic_endpoint(self, target: TeacherTarget, path: str) -> tuple[str, dict[str, str]]:
        """Anthropic's API: ``x-api-key`` and ``anthropic-version``; a base with or without ``/v1``."""
        base, basic = _split_credentials(target.api_base or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com")
        base = base.rstrip("/")
        if base.endswith("/messages"):
            base = base[: -len("/messages")]
        if not base.endswith("/v1"):
            base += "/v1"
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        key = self._api_key or os.environ.get("ANTHROPIC_API_KEY")
        if key:
            headers["x-api-key"] = key
        elif basic:
            headers["authorization"] = basic
        return base + path, headers

    async def _post(self, target: TeacherTarget, path: str, body: dict[str, Any], deadline: float) -> aiohttp.ClientResponse:
        assert self._session is not None, "TeacherClient.start() was not called"
        url, headers = self._url_and_headers(target, path)
        payload = dict(body)
        payload["model"] = target.upstream_model
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout(f"The teacher did not answer within {self.timeout_s:g}s.")
        try:
            resp = await self._session.post(
                url, data=orjson.dumps(payload), headers=headers, timeout=aiohttp.ClientTimeout(total=remaining)
            )
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"The teacher did not answer within {self.timeout_s:g}s.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"Could not reach the teacher ({type(exc).__name__}).") from None
        except ValueError as exc:  # aiohttp refuses a URL it cannot use; the operator's config, not the client's fault
            log.error("teacher %s: unusable request (%s)", target.model, exc)
            raise UpstreamError(f"The teacher's endpoint is misconfigured ({type(exc).__name__}).") from None
        if resp.status >= 400:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                raw = b""
            finally:
                resp.release()
            raise _status_error(resp.status, raw, dict(resp.headers))
        return resp

    async def _direct_json(self, target: TeacherTarget, path: str, body: dict[str, Any], deadline: float, *,
                           shape: str | None = None) -> TeacherResponse:
        resp = await self._post(target, path, body, deadline)
        try:
            raw = await resp.read()
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"The teacher did not answer within {self.timeout_s:g}s.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"The teacher's answer was cut off ({type(exc).__name__}).") from None
        finally:
            resp.release()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("The teacher's answer was not valid JSON.") from None
        expected = _NATIVE_SHAPES[shape] if shape else ("choices", "data")
        if not isinstance(parsed, dict) or not any(k in parsed for k in expected):
            raise UpstreamError(f"The teacher's answer was not a{'n' if shape != 'messages' else ''} "
                                f"{'Anthropic' if shape == 'messages' else 'OpenAI'} response.")
        return TeacherResponse(body=parsed, raw=raw, headers=_pass_headers(resp.headers))

    async def _direct_stream(self, target: TeacherTarget, body: dict[str, Any], deadline: float, *,
                             path: str = "/chat/completions") -> TeacherStream:
        resp = await self._post(target, path, body, deadline)
        stream = TeacherStream(_sse_events(resp, self.timeout_s), closer=resp.release)
        # Read the first event now, so that a failure before any byte reaches the client is retried
        # and reported with a proper status instead of an empty 200 stream.
        iterator = stream._events.__aiter__()
        try:
            stream.first = await iterator.__anext__()
        except StopAsyncIteration:
            resp.release()
            raise UpstreamError("The teacher closed the stream before sending anything.") from None
        except GatewayError:
            resp.release()
            raise
        payload = sse_data(stream.first or b"")
        valid = payload == b"[DONE]"
        if payload and not valid:
            try:
                valid = isinstance(orjson.loads(payload), dict)
            except orjson.JSONDecodeError:
                valid = False
        if not valid:
            resp.release()
            raise UpstreamError("The teacher's stream is not server-sent events of its API.")
        stream._events = iterator
        return stream

    # -- litellm --------------------------------------------------------------------------
    def _litellm_kwargs(self, target: TeacherTarget, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        # ``body`` is already the surface's allowlist (gateway.params); provider options are filtered
        # again here because litellm reads them from the same keyword arguments, and ``metadata`` is
        # litellm's own (its callbacks'), not the provider's.
        kwargs = {k: v for k, v in body.items() if k not in ("model", "metadata") and not is_provider_option(k)}
        kwargs["model"] = target.model
        if target.api_base:
            kwargs["api_base"] = target.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        kwargs["timeout"] = max(0.1, deadline - time.monotonic())
        kwargs["num_retries"] = 0  # our own retry loop owns retries
        return kwargs

    async def _litellm_chat(self, target: TeacherTarget, body: dict[str, Any], deadline: float) -> TeacherResponse:
        litellm = load_litellm()
        try:
            resp = await litellm.acompletion(**self._litellm_kwargs(target, body, deadline))
        except Exception as exc:  # litellm raises its own hierarchy; map by status
            raise _litellm_error(exc) from None
        return TeacherResponse(body=resp.model_dump(exclude_none=True))

    async def _litellm_stream(self, target: TeacherTarget, body: dict[str, Any], deadline: float) -> TeacherStream:
        litellm = load_litellm()
        try:
            resp = await litellm.acompletion(**self._litellm_kwargs(target, body, deadline))
        except Exception as exc:
            raise _litellm_error(exc) from None

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp:
                    yield b"data: " + orjson.dumps(chunk.model_dump(exclude_none=True)) + b"\n\n"
            except Exception as exc:
                raise _litellm_error(exc) from None
            yield b"data: [DONE]\n\n"

        return TeacherStream(events())

    async def _litellm_embeddings(self, target: TeacherTarget, body: dict[str, Any], deadline: float) -> TeacherResponse:
        litellm = load_litellm()
        try:
            resp = await litellm.aembedding(**self._litellm_kwargs(target, body, deadline))
        except Exception as exc:
            raise _litellm_error(exc) from None
        return TeacherResponse(body=resp.model_dump(exclude_none=True))


async def _sse_events(resp: aiohttp.ClientResponse, timeout_s: float) -> AsyncIterator[bytes]:
    """Yield each complete SSE event (ending in a blank line) as the upstream sent it."""
    buffer = b""
    try:
        async for piece in resp.content.iter_any():
            buffer += piece
            while True:
                cut = buffer.find(b"\n\n")
                if cut < 0:
                    break
                event, buffer = buffer[: cut + 2], buffer[cut + 2 :]
                if event.strip():
                    yield event
    except asyncio.TimeoutError:
        raise UpstreamTimeout(f"The teacher's stream stalled past {timeout_s:g}s.") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The teacher's stream was cut off ({type(exc).__name__}).") from None
    finally:
        resp.release()
    if buffer.strip():
        yield buffer if buffer.endswith(b"\n\n") else buffer.rstrip(b"\n") + b"\n\n"


def sse_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one SSE event (OpenAI's have only that line; Anthropic's and the
    Responses API's an ``event:`` line first); None when it has none."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


def _split_credentials(base: str) -> tuple[str, str | None]:
    """A base URL without the ``user:password@`` it may carry, and those as a Basic header."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(base)
    if parts.username is None and parts.password is None:
        return base, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    token = base64.b64encode(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()).decode()
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), f"Basic {token}"


def _pass_headers(headers: Any) -> dict[str, str]:
    out = {}
    for name in ("retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"):
        if name in headers:
            out[name] = headers[name]
    return out


def _status_error(status: int, raw: bytes, headers: dict[str, str]) -> GatewayError:
    message = None
    try:
        parsed = orjson.loads(raw)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict):
            message = err.get("message")
        elif isinstance(parsed, dict) and parsed.get("message"):  # vLLM's older ErrorResponse
            message = parsed["message"]
    except orjson.JSONDecodeError:
        pass
    message = f"The teacher answered {status}: {message or raw[:200].decode('utf-8', 'replace') or 'no details'}"
    passed = _pass_headers({k.lower(): v for k, v in headers.items()})
    if status == 429:
        return UpstreamRateLimited(message, headers=passed)
    if status in (408, 504):
        return UpstreamTimeout(message, headers=passed)
    err_type = "invalid_request_error" if 400 <= status < 500 else "api_error"
    exc = UpstreamStatus(message, status=status, headers=passed)
    exc.type = err_type
    exc.code = "upstream_" + str(status)
    return exc


def _litellm_error(exc: Exception) -> GatewayError:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    message = str(getattr(exc, "message", "") or exc)
    # litellm messages can echo request details; keep them short and never include headers
    message = message.splitlines()[0][:300] if message else name
    if "Timeout" in name:
        return UpstreamTimeout(f"The teacher timed out: {message}")
    if status == 429 or "RateLimit" in name:
        return UpstreamRateLimited(f"The teacher is rate limited: {message}")
    if isinstance(status, int) and status >= 400:
        err = UpstreamStatus(f"The teacher answered {status}: {message}", status=status)
        if status < 500:
            err.type = "invalid_request_error"
        return err
    if "Connection" in name:
        return UpstreamError(f"Could not reach the teacher: {message}")
    return UpstreamError(f"The teacher call failed ({name}): {message}")
