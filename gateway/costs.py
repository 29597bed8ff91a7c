"""What an exchange costs, from litellm's price map (read offline) and per-model overrides.

Prices are USD per token. ``prompt_tokens`` includes cached tokens (OpenAI's convention), and
``completion_tokens`` includes reasoning tokens; each part is priced at its own rate where the map
has one (cache reads are cheaper; reasoning is priced as output unless the model says otherwise).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gateway.settings import PriceOverride

log = logging.getLogger(__name__)

__all__ = ["Prices", "PriceBook", "Usage", "load_litellm", "DEFAULT_MAX_OUTPUT_TOKENS"]

DEFAULT_MAX_OUTPUT_TOKENS = 4096


def load_litellm() -> Any:
    """Import litellm without letting it fetch its price map from the network."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


@dataclass(frozen=True)
class Prices:
    input: float
    output: float
    cached_input: float
    reasoning: float
    known: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> "Usage":
        if not usage:
            return cls()
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(prompt_details.get("cached_tokens") or 0),
            reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        )


class PriceBook:
    """Looks prices up once per model and caches them."""

    def __init__(self, overrides: dict[str, PriceOverride] | None = None):
        self.overrides = overrides or {}
        self._cache: dict[str, Prices] = {}

    def prices(self, model: str) -> Prices:
        cached = self._cache.get(model)
        if cached is None:
            cached = self._cache[model] = self._lookup(model)
        return cached

    def _lookup(self, model: str) -> Prices:
        bare = model.split("/", 1)[1] if "/" in model else model
        for name in (model, bare):
            if name in self.overrides:
                o = self.overrides[name]
                return Prices(
                    input=o.input_per_token,
                    output=o.output_per_token,
                    cached_input=o.cached_input_per_token if o.cached_input_per_token is not None else o.input_per_token,
                    reasoning=o.reasoning_per_token if o.reasoning_per_token is not None else o.output_per_token,
                )
        table = _model_cost()
        for name in (model, bare):
            entry = table.get(name)
            if entry and "input_cost_per_token" in entry:
                inp = float(entry.get("input_cost_per_token") or 0.0)
                out = float(entry.get("output_cost_per_token") or 0.0)
                return Prices(
                    input=inp,
                    output=out,
                    cached_input=float(entry.get("cache_read_input_token_cost") or inp),
                    reasoning=float(entry.get("output_cost_per_reasoning_token") or out),
                )
        log.warning("no price known for model %r: its exchanges are recorded at cost 0", model)
        return Prices(0.0, 0.0, 0.0, 0.0, known=False)

    def max_output_tokens(self, model: str) -> int:
        """The most tokens ``model`` answers with (litellm's price map), else DEFAULT_MAX_OUTPUT_TOKENS:
        what a budget reserves for a request that sets no ``max_tokens``."""
        table = _model_cost()
        bare = model.split("/", 1)[1] if "/" in model else model
        for name in (model, bare):
            entry = table.get(name) or {}
            value = entry.get("max_output_tokens") or entry.get("max_tokens")
            if isinstance(value, (int, float)) and value > 0:
                return int(value)
        return DEFAULT_MAX_OUTPUT_TOKENS

    def cost(self, model: str, usage: Usage) -> float:
        p = self.prices(model)
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        return (
            (usage.prompt_tokens - cached) * p.input
            + cached * p.cached_input
            + (usage.completion_tokens - reasoning) * p.output
            + reasoning * p.reasoning
        )


@lru_cache(maxsize=1)
def _model_cost() -> dict[str, Any]:
    return load_litellm().model_cost
