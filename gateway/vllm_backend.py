"""The ``vllm`` backend for LM students: an external vLLM OpenAI-compatible server.

vLLM serves the base model and loads each promoted student's LoRA adapter at runtime (the server runs
with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)::

    POST /v1/load_lora_adapter    {"lora_name": N, "lora_path": P}   200 text "Success: ..."
    POST /v1/unload_lora_adapter  {"lora_name": N}                   200 text "Success: ..."
    POST /v1/chat/completions     {"model": N, "messages", "logprobs": true, "top_logprobs": k, ...}

Requests address the adapter by its name as ``model``. The answer's token logprobs feed the
artifact's calibrator (the same code as the embedded backend: :func:`router.lm_student.confidence_for`).

vLLM's error bodies are ``{"error": {"message", "type", "param", "code"}}`` in recent versions and
``{"object": "error", "message", "type", "param", "code"}`` in older ones; without runtime LoRA
updating the two adapter endpoints do not exist (FastAPI's 404 ``{"detail": "Not Found"}``). They map to::

    VLLMError (StudentError: the gateway escalates to the teacher)
    ├── VLLMUnavailable             connection refused, timeout
    ├── VLLMRuntimeLoRADisabled     404 on the adapter endpoints: VLLM_ALLOW_RUNTIME_LORA_UPDATING unset
    ├── AdapterAlreadyLoaded        400 "The lora adapter 'N' has already been loaded."
    ├── AdapterNotFound             404 (400 in some versions): unknown adapter, or no adapter at lora_path
    ├── ModelNotFound               404 "The model `N` does not exist."
    ├── VLLMBadRequest              other 4xx
    └── VLLMServerError             5xx
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx

from router.lm_student import Calibrator, confidence_for, register_backend
from router.student import StudentError, StudentOutput

__all__ = [
    "VLLMError",
    "VLLMUnavailable",
    "VLLMRuntimeLoRADisabled",
    "AdapterAlreadyLoaded",
    "AdapterNotFound",
    "ModelNotFound",
    "VLLMBadRequest",
    "VLLMServerError",
    "VLLMClient",
    "VLLMStudent",
    "adapter_name",
    "ensure_adapter",
    "release_adapter",
    "close_async",
    "shut_down",
    "base_url_of",
]

log = logging.getLogger(__name__)


class VLLMError(StudentError):
    """vLLM refused or failed a request; ``status``, ``type`` and ``code`` are vLLM's own."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None, code: Any = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code


class VLLMUnavailable(VLLMError):
    pass


class VLLMRuntimeLoRADisabled(VLLMError):
    pass


class AdapterAlreadyLoaded(VLLMError):
    pass


class AdapterNotFound(VLLMError):
    pass


class ModelNotFound(VLLMError):
    pass


class VLLMBadRequest(VLLMError):
    pass


class VLLMServerError(VLLMError):
    pass


def adapter_name(route: str, version: int) -> str:
    """The name a student's adapter is loaded under in vLLM (and addressed by as ``model``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{route}-v{version}")


def _error_fields(response: httpx.Response) -> tuple[str, str | None, Any]:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}", None, None
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):  # recent vLLM: OpenAI's envelope
            err = body["error"]
            return str(err.get("message", "")), err.get("type"), err.get("code")
        if body.get("object") == "error" or "message" in body:  # older vLLM ErrorResponse
            return str(body.get("message", "")), body.get("type"), body.get("code")
        if "detail" in body:  # FastAPI: the route does not exist
            return str(body["detail"]), None, None
    return str(body), None, None


def _raise_for(response: httpx.Response, operation: str, name: str) -> None:
    """Turn a vLLM error response into the matching :class:`VLLMError`."""
    if response.status_code < 400:
        return
    message, etype, code = _error_fields(response)
    status = response.status_code
    kw = dict(status=status, type=etype, code=code)
    full = f"vLLM refused to {operation} {name!r} (HTTP {status}): {message}"
    if operation in ("load adapter", "unload adapter"):
        if status == 404 and etype is None and message == "Not Found":
            raise VLLMRuntimeLoRADisabled(
                f"vLLM has no {operation.replace(' ', '_')} endpoint: start it with --enable-lora and the "
                "environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.",
                **kw,
            )
        if "already been loaded" in message:
            raise AdapterAlreadyLoaded(full, **kw)
        if status == 404 or "cannot be found" in message or "No adapter found" in message:
            raise AdapterNotFound(full, **kw)
    if operation == "generate with" and status == 404:
        raise ModelNotFound(full + " (is the adapter loaded?)", **kw)
    if status >= 500:
        raise VLLMServerError(full, **kw)
    raise VLLMBadRequest(full, **kw)


def _chat_body(model: str, messages: list[dict[str, Any]], params: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": int(params.get("max_completion_tokens") or params.get("max_tokens") or default_max_tokens),
        "temperature": float(params.get("temperature") or 0.0),
        "logprobs": True,  # the confidence is computed from them, whatever the client asked
        "top_logprobs": int(params.get("top_logprobs") or 0),
    }
    for key in ("top_p", "stop", "seed"):
        if params.get(key) is not None:
            body[key] = params[key]
    return body


def _output(
    response: dict[str, Any], messages: list[dict[str, Any]], calibrator: Calibrator | None, version: int, model: str
) -> StudentOutput:
    try:
        choice = response["choices"][0]
        text = choice["message"].get("content") or ""
        content = (choice.get("logprobs") or {}).get("content") or []
    except (KeyError, IndexError, TypeError) as exc:
        raise VLLMBadRequest(f"vLLM answered {model!r} with an unexpected body: {exc!r}") from exc
    token_logprobs = [float(e["logprob"]) for e in content]
    conf, embeddings = confidence_for(calibrator, [token_logprobs], [messages])
    usage = response.get("usage") or {}
    return StudentOutput(
        text=text,
        confidence=float(conf[0]),
        version=version,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or len(content)),
        logprobs=content,
        embedding=embeddings[0].tobytes() if embeddings is not None else None,
        embedding_model=calibrator.embedding_model if embeddings is not None and calibrator else None,
        extra={"finish_reason": choice.get("finish_reason"), "backend": "vllm", "model": model},
    )


def ensure_adapter(http: httpx.Client, name: str, path: str) -> None:
    """Load the adapter at ``path`` (as the vLLM server sees it) under ``name``; one that another
    gateway replica loaded already is fine."""
    try:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    except httpx.TransportError as exc:
        raise VLLMUnavailable(f"vLLM at {http.base_url} is unreachable: {exc!r}") from exc
    try:
        _raise_for(response, "load adapter", name)
    except AdapterAlreadyLoaded:
        log.info("adapter %s was already loaded in vLLM", name)  # another gateway replica did it


def release_adapter(http: httpx.Client, name: str) -> None:
    """Unload a retired version's adapter; failures are logged, never raised (closing goes on)."""
    try:
        response = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        _raise_for(response, "unload adapter", name)
    except AdapterNotFound:
        pass
    except VLLMError as exc:
        log.warning("could not unload adapter %s: %s", name, exc)
    except httpx.TransportError as exc:
        log.warning("could not unload adapter %s: vLLM unreachable (%r)", name, exc)


def close_async(client: "VLLMClient") -> None:
    """Close an async client from sync code, inside or outside a running loop."""
    import asyncio

    try:
        asyncio.get_running_loop().create_task(client.aclose())
    except RuntimeError:  # no running loop: close synchronously
        asyncio.run(client.aclose())


class VLLMClient:
    """Async client for one vLLM server. ``transport`` lets tests swap the network."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "VLLMClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise VLLMUnavailable(f"vLLM at {self.base_url} is unreachable: {exc!r}") from exc

    async def models(self) -> list[str]:
        """Ids of what the server serves: the base model(s) and every loaded adapter."""
        try:
            response = await self._http.get("/v1/models")
        except httpx.TransportError as exc:
            raise VLLMUnavailable(f"vLLM at {self.base_url} is unreachable: {exc!r}") from exc
        _raise_for(response, "list", "models")
        return [m["id"] for m in response.json().get("data", [])]

    async def load_adapter(self, name: str, path: str | Path) -> str:
        """Load a LoRA adapter (PEFT directory on the server's filesystem) under ``name``."""
        response = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        _raise_for(response, "load adapter", name)
        log.info("vLLM %s: loaded adapter %s from %s", self.base_url, name, path)
        return response.text

    async def unload_adapter(self, name: str) -> str:
        """Unload the adapter ``name`` (AdapterNotFound if it is not loaded)."""
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        _raise_for(response, "unload adapter", name)
        log.info("vLLM %s: unloaded adapter %s", self.base_url, name)
        return response.text

    async def chat(self, model: str, messages: list[dict[str, Any]], params: dict[str, Any], *, default_max_tokens: int = 256) -> dict[str, Any]:
        """One chat completion addressed to ``model`` (an adapter name), with logprobs; the raw body."""
        response = await self._post("/v1/chat/completions", _chat_body(model, messages, params, default_max_tokens))
        _raise_for(response, "generate with", model)
        return response.json()

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One ``/v1/completions`` call (``body["model"]``: an adapter name); the raw body."""
        response = await self._post("/v1/completions", body)
        _raise_for(response, "generate with", str(body.get("model")))
        return response.json()

    async def generate(
        self,
        adapter: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        calibrator: Calibrator | None = None,
        version: int = 0,
        default_max_tokens: int = 256,
    ) -> StudentOutput:
        """Generate with the adapter and score the answer with ``calibrator``."""
        body = await self.chat(adapter, messages, params, default_max_tokens=default_max_tokens)
        return _output(body, messages, calibrator, version, adapter)


class VLLMStudent:
    """An ``lm`` student served by vLLM: its adapter loaded at start, unloaded on ``close``.

    ``predict`` is blocking (sync httpx); ``apredict`` is the event loop's path.
    """

    kind = "lm"

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        *,
        base_url: str,
        api_key: str | None = None,
        lora_path: str | None = None,
        timeout: float = 60.0,
        unload_on_close: bool = True,
        transport: httpx.BaseTransport | None = None,
    ):
        if manifest.get("weights") != "adapter":
            raise StudentError(
                f"The lm artifact in {directory} holds full weights; vLLM can load only LoRA adapters at runtime. "
                "Serve it with the embedded backend, or train it with method='lora'."
            )
        self.directory = Path(directory)
        self.manifest = manifest
        self.route = str(manifest.get("route", ""))
        self.version = int(manifest.get("version", 0))
        self.adapter = adapter_name(self.route, self.version)
        # vLLM reads the adapter from its own filesystem: the shared volume must mount at the same path,
        # or the caller passes the path as vLLM sees it.
        self.lora_path = lora_path or str(self.directory / "adapter")
        self.calibrator = Calibrator.from_json(manifest["calibration"]) if manifest.get("calibration") else None
        self.max_tokens = int(manifest.get("generation", {}).get("max_tokens", 256))
        self.unload_on_close = unload_on_close
        self.client = VLLMClient(base_url, api_key=api_key, timeout=timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sync = httpx.Client(base_url=self.client.base_url, headers=headers, timeout=timeout, transport=transport)
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        ensure_adapter(self._sync, self.adapter, self.lora_path)

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> StudentOutput:
        """Blocking generation through vLLM."""
        body = _chat_body(self.adapter, messages, params or {}, self.max_tokens)
        try:
            response = self._sync.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise VLLMUnavailable(f"vLLM at {self.client.base_url} is unreachable: {exc!r}") from exc
        _raise_for(response, "generate with", self.adapter)
        return _output(response.json(), messages, self.calibrator, self.version, self.adapter)

    async def apredict(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> StudentOutput:
        """Non-blocking generation through vLLM."""
        return await self.client.generate(
            self.adapter, messages, params or {}, calibrator=self.calibrator, version=self.version, default_max_tokens=self.max_tokens
        )

    def close(self) -> None:
        """Unload the adapter (a retired version) and close the connections."""
        shut_down(self._sync, self.client, self.adapter if self.unload_on_close else None)


def shut_down(http: httpx.Client, client: VLLMClient, adapter: str | None) -> None:
    """A vLLM-served student's close: unload ``adapter`` (a retired version; None keeps it loaded) and
    close both clients."""
    if adapter is not None:
        release_adapter(http, adapter)
    http.close()
    close_async(client)


def base_url_of(options: dict[str, Any]) -> str:
    """The vLLM server a backend factory was given, or the error that says which setting is missing."""
    base_url = options.get("vllm_base_url")
    if not base_url:
        raise StudentError("The vllm backend needs vllm_base_url (settings: vllm_base_url).")
    return str(base_url)


def _factory(directory: Path, manifest: dict[str, Any], **options: Any) -> VLLMStudent:
    return VLLMStudent(
        directory,
        manifest,
        base_url=base_url_of(options),
        api_key=options.get("vllm_api_key"),
        lora_path=options.get("vllm_lora_path"),
        timeout=float(options.get("vllm_timeout_s", 60.0)),
    )


register_backend("vllm", _factory)
