"""Prices from litellm's map (offline), cached and reasoning tokens, and overrides."""

from __future__ import annotations

import pytest

from gateway.money import PriceBook, Usage
from gateway.settings import PriceOverride


def test_cached_and_reasoning_tokens_are_priced_at_their_rates():
    book = PriceBook()
    p = book.prices("openai/gpt-4o")
    assert p.known and p.cached_input < p.input
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400, reasoning_tokens=200)
    expected = 600 * p.input + 400 * p.cached_input + 300 * p.output + 200 * p.reasoning
    assert book.cost("openai/gpt-4o", usage) == pytest.approx(expected)
    # gpt-4o: $2.50/M input, $1.25/M cached, $10/M output (litellm's local map)
    assert book.cost("gpt-4o", Usage(prompt_tokens=1_000_000)) == pytest.approx(2.5)


def test_usage_reads_openai_details():
    u = Usage.from_openai({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4},
                           "completion_tokens_details": {"reasoning_tokens": 3}})
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens) == (10, 5, 4, 3)


def test_overrides_win_and_unknown_models_cost_zero():
    book = PriceBook({"my-finetune": PriceOverride(input_per_token=1e-6, output_per_token=2e-6)})
    assert book.cost("openai/my-finetune", Usage(prompt_tokens=10, completion_tokens=10)) == pytest.approx(3e-5)
    assert book.cost("nobody/knows-this", Usage(prompt_tokens=10)) == 0.0
    assert not book.prices("nobody/knows-this").known


def test_gateway_startup_loads_the_price_map_and_freezes_it_out_of_the_collector(make_gateway):
    """Under load, full garbage collections over litellm's price map and the imported libraries
    (about 300k objects, nothing to free) stalled the event loop for 115-135 ms every 0.7 s."""
    import gc

    from gateway import money as costs

    gc.unfreeze()
    costs._model_cost.cache_clear()
    make_gateway()
    assert costs._model_cost.cache_info().currsize == 1  # loaded at startup, not by the first request
    assert gc.get_freeze_count() > 100_000
