"""Money: what every answer cost, what the teacher alone would have cost, and the saving.

Every figure kdgate reports in dollars is computed here: the response headers, the ledger's cost
columns, the dashboard, ``kdgate stats`` and the benches. The definitions:

- **price**: USD per token, from litellm's price map (read offline), ``price_overrides`` winning.
  ``prompt_tokens`` includes cached tokens (OpenAI's convention) and ``completion_tokens`` includes
  reasoning tokens; each part is priced at its own rate where the map has one.
- **teacher cost** of an exchange the teacher answered: its usage at the teacher's price.
- **student cost** of a student answer: ``student_price_per_1k_tokens`` per thousand tokens plus
  ``student_price_per_gpu_hour`` for the time it took (both 0 by default: an in-process student).
- **counterfactual** (teacher-only cost): for a teacher answer its teacher cost; for a student
  answer what the teacher would have charged for the same prompt and answer, token counts estimated
  from the route's own tokens per character of its teacher traffic (:func:`estimate_tokens`).
- **check cost**: the teacher call made only to check a student answer (a shadow check), at the
  teacher's price. It is recorded once, on the check's own row, never added to the exchange's.
- **actual spend** = exchange costs + check costs; **saved** = counterfactual - actual spend.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gateway.settings import PriceOverride

log = logging.getLogger(__name__)

__all__ = [
    "Prices", "PriceBook", "Usage", "load_litellm", "DEFAULT_MAX_OUTPUT_TOKENS", "Money", "TokenRatios",
    "estimate_tokens", "actual_spend", "saved", "format_usd",
]

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


@dataclass(frozen=True)
class TokenRatios:
    """Tokens per character of a route's teacher traffic, to price what the teacher would have
    charged for an answer it did not give (0.25 is the usual English ratio, for a route with none)."""

    prompt: float = 0.25
    completion: float = 0.25

    @classmethod
    def from_sums(cls, *, prompt_tokens: float | None, prompt_chars: float | None,
                  completion_tokens: float | None, completion_chars: float | None) -> "TokenRatios":
        return cls(
            prompt=(prompt_tokens / prompt_chars) if prompt_tokens and prompt_chars else 0.25,
            completion=(completion_tokens / completion_chars) if completion_tokens and completion_chars else 0.25,
        )


def estimate_tokens(chars: int, ratio: float) -> int:
    """Tokens of a text of ``chars`` characters at a route's ``ratio`` (at least 1)."""
    return max(1, round(chars * ratio))


class Money:
    """The money of one gateway: its price book and what a student answer costs."""

    def __init__(self, prices: PriceBook, *, student_per_1k_tokens: float = 0.0, student_per_gpu_hour: float = 0.0):
        self.prices = prices
        self.student_per_1k_tokens = student_per_1k_tokens
        self.student_per_gpu_hour = student_per_gpu_hour

    def teacher_cost(self, model: str, usage: Usage) -> float:
        """What the teacher charged for an exchange (also the exchange's counterfactual)."""
        return self.prices.cost(model, usage)

    def check_cost(self, model: str, usage: Usage) -> float:
        """What a shadow check's teacher call cost (recorded on the check's row only)."""
        return self.prices.cost(model, usage)

    def student_cost(self, *, tokens: int, seconds: float) -> float:
        """What a student answer cost: per token and per GPU-hour of the time it took."""
        return self.student_per_1k_tokens * tokens / 1000.0 + self.student_per_gpu_hour * seconds / 3600.0

    def counterfactual(self, model: str, *, prompt_tokens: int, completion_tokens: int) -> float:
        """What the teacher ``model`` would have charged for an answer it did not give."""
        return self.prices.cost(model, Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))

    def max_cost(self, model: str, *, prompt_tokens: int, completion_tokens: int | None, n: int = 1) -> float:
        """The most one request can cost: its prompt and ``completion_tokens`` (or the model's
        maximum output, ``n`` times) at the teacher's price; what a budget reserves."""
        out = completion_tokens if completion_tokens is not None else self.prices.max_output_tokens(model) * max(1, n)
        return self.prices.cost(model, Usage(prompt_tokens=prompt_tokens, completion_tokens=out))

    def known(self, model: str) -> bool:
        """Whether ``model`` has a price (an unpriced teacher cannot be budgeted)."""
        return self.prices.prices(model).known


def actual_spend(cost_usd: float, check_cost_usd: float) -> float:
    """What was really spent: the exchanges' costs plus the shadow checks'."""
    return cost_usd + check_cost_usd


def saved(teacher_only_usd: float, actual_usd: float) -> float:
    """The saving: what the teacher alone would have cost, less what was really spent."""
    return teacher_only_usd - actual_usd


def format_usd(value: float) -> str:
    """A dollar amount for a header or a table: enough digits that a small non-zero one shows."""
    if not value:
        return "0"
    return f"{value:.10f}".rstrip("0").rstrip(".")

