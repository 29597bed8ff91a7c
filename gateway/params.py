"""Which request fields reach a teacher: one allowlist per surface, built once.

A client's body is never spread into a provider call as it is. litellm takes its own options as
keyword arguments beside the provider's parameters (``base_url``, ``api_key``, ``custom_llm_provider``,
``mock_response``, ``extra_body``, ...), so a field named like one of them would let any holder of a
gateway key send the operator's provider key to a host of their choosing, or write a made-up teacher
answer into a route's training data for free. Here:

- the documented parameters of each surface (OpenAI's chat completions, embeddings, Responses and
  legacy completions; Anthropic's Messages) pass;
- provider and client options (:data:`PROVIDER_OPTIONS`, and anything prefixed ``litellm_``,
  ``aws_``, ``vertex_``, ``azure_``) are refused with a 400 that names the field;
- anything else is dropped; its name (never its value) is logged and returned in the
  ``x-kdgate-ignored-params`` response header, so a client can see what the teacher did not get.

The operator may let more names through for OpenAI-compatible upstreams that take extra sampling
parameters (vLLM's ``top_k``, ``min_p``, ``guided_json``): ``teacher_extra_params`` in the settings.
Provider options can never be added that way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest

log = logging.getLogger(__name__)

__all__ = [
    "CHAT_PARAMS",
    "EMBEDDINGS_PARAMS",
    "PROVIDER_OPTIONS",
    "ParamPolicy",
    "Forwarded",
    "is_provider_option",
]

# OpenAI's documented chat-completions parameters (https://platform.openai.com/docs/api-reference/chat/create).
CHAT_PARAMS: frozenset[str] = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
    "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options",
})

# OpenAI's documented embeddings parameters.
EMBEDDINGS_PARAMS: frozenset[str] = frozenset({"model", "input", "dimensions", "encoding_format", "user"})

# Options of the provider call itself, never of the request: credentials, endpoints, transport,
# litellm's own switches. A client that sends one is refused (it is an attack or a broken client).
PROVIDER_OPTIONS: frozenset[str] = frozenset({
    "api_key", "api_base", "base_url", "api_version", "api_type", "organization",
    "custom_llm_provider", "mock_response", "mock_tool_calls", "mock_timeout", "mock_delay",
    "extra_body", "extra_headers", "extra_query", "headers", "timeout", "request_timeout", "stream_timeout",
    "num_retries", "max_retries", "retry_policy", "fallbacks", "context_window_fallbacks",
    "content_policy_fallbacks", "model_list", "deployment_id", "region_name",
    "input_cost_per_token", "output_cost_per_token", "input_cost_per_second", "output_cost_per_second",
    "cost_per_token", "caching", "cache", "no-log", "no_log", "client", "http_client", "callbacks",
    "success_callback", "failure_callback", "logger_fn", "proxy_server_request", "model_info",
    "hf_model_name", "custom_prompt_dict", "preset_cache_key", "base_model", "drop_params",
    "additional_drop_params", "ssl_verify", "user_continue_message", "acompletion", "aembedding",
    "azure_ad_token", "azure_ad_token_provider", "azure_username", "azure_password", "client_id",
    "client_secret", "tenant_id", "google_application_credentials", "watsonx_region_name",
    "vertex_credentials", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "aws_region_name", "aws_profile_name", "aws_role_name", "aws_web_identity_token",
    "aws_bedrock_runtime_endpoint", "aws_sts_endpoint", "max_parallel_requests",
    "secret_fields", "user_api_key", "api_key_alias", "use_in_pass_through", "use_litellm_proxy",
    "merge_reasoning_content_in_choices", "mock_testing_fallbacks",
})
_PROVIDER_PREFIXES = ("litellm_", "aws_", "vertex_", "azure_", "bedrock_", "sagemaker_", "watsonx_")


def is_provider_option(name: str) -> bool:
    """True for a name that configures the provider call (credentials, endpoints, litellm switches)."""
    lowered = name.lower()
    return lowered in PROVIDER_OPTIONS or lowered.startswith(_PROVIDER_PREFIXES)


@dataclass(frozen=True)
class Forwarded:
    """What a teacher gets from one request, and the names of the fields it does not get."""

    body: dict[str, Any]
    ignored: tuple[str, ...] = ()

    def header(self) -> dict[str, str]:
        """``x-kdgate-ignored-params`` when something was dropped (names only, comma-separated)."""
        if not self.ignored:
            return {}
        return {"x-kdgate-ignored-params": ",".join(_printable(n) for n in self.ignored[:32])}


def _printable(name: str) -> str:
    """A field name safe for a response header and a log line (no control characters, bounded)."""
    return "".join(ch if ch.isprintable() and ch not in ",\r\n" else "?" for ch in name[:64])


class ParamPolicy:
    """The allowlists of the gateway's surfaces, plus the operator's ``teacher_extra_params``."""

    def __init__(self, extra: Iterable[str] = ()):
        extra = frozenset(extra)
        bad = sorted(n for n in extra if is_provider_option(n))
        if bad:
            raise ValueError(f"teacher_extra_params cannot include provider options: {', '.join(bad)}")
        self.extra = extra
        from gateway.surfaces import completions, messages, responses  # they import this module

        self.surfaces: dict[str, frozenset[str]] = {
            "chat.completions": CHAT_PARAMS | extra,
            "embeddings": EMBEDDINGS_PARAMS | extra,
            # what a teacher that speaks the surface natively is sent (the others get the chat form)
            "responses": responses.PARAMS,
            "messages": messages.PARAMS,
            "messages.count_tokens": messages.COUNT_TOKENS_PARAMS,
            "completions": completions.PARAMS | extra,
        }

    def forward(self, surface: str, body: Mapping[str, Any], *, drop: Iterable[str] = ()) -> Forwarded:
        """The teacher's body for ``surface``: allowed fields only, less ``drop`` (fields the gateway
        itself consumed). Raises :class:`BadRequest` for a provider option anywhere at the top level."""
        allowed = self.surfaces[surface]
        skip = frozenset(drop)
        out: dict[str, Any] = {}
        ignored: list[str] = []
        for name, value in body.items():
            if name in allowed and name not in skip:  # the common case: no provider option is allowed
                out[name] = value
                continue
            if not isinstance(name, str):  # pragma: no cover - JSON keys are strings
                continue
            if is_provider_option(name):
                raise BadRequest(
                    f"Unrecognized request argument supplied: {_printable(name)}. Provider options (credentials, "
                    "endpoints, litellm switches) are the gateway operator's, never the client's.",
                    param=_printable(name), code="unsupported_parameter",
                )
            if name in skip:
                continue
            if name in allowed:
                out[name] = value
            else:
                ignored.append(name)
        if ignored:
            log.info("%s: dropped request field(s) the teacher is not sent: %s", surface, ", ".join(_printable(n) for n in ignored[:32]))
        return Forwarded(out, tuple(ignored))
