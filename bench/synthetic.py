"""A synthetic free-text route: a deterministic templated rewrite a teacher would answer.

The "teacher" turns an order line into a confirmation sentence. The answer is a pure function of the
prompt, so exact agreement is the right measure, and a student must copy names and inflect nouns
(a real, if small, generation task). :func:`out_of_distribution` draws names the training traffic
never contains, to give the confidence something it should be unsure about.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SYSTEM_PROMPT",
    "SyntheticExample",
    "teacher_answer",
    "examples",
    "out_of_distribution",
    "seed_ledger",
]

SYSTEM_PROMPT = "Rewrite the order as a confirmation."

NAMES = [
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Mallory", "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yolanda", "Zoe",
]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "silver", "brown"]
ITEMS = ["lamp", "chair", "table", "desk", "mug", "clock", "shelf", "rug", "pillow", "mirror", "basket", "vase"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Oslo", "Prague", "Dublin", "Warsaw", "Athens", "Zurich"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Names that never occur in training traffic: a student can only copy them token by token.
OOD_NAMES = ["Quintessa", "Bartholomew", "Xiomara", "Gwendolyn", "Thaddeus", "Ottoline", "Kazimierz", "Evangelina"]


@dataclass(frozen=True)
class SyntheticExample:
    messages: list[dict[str, str]]
    answer: str


def teacher_answer(*, name: str, qty: int, color: str, item: str, city: str) -> str:
    """The teacher's rewrite: quantity in words, plural noun, fixed sentence shape."""
    noun = item if qty == 1 else item + "s"
    return f"Confirmed: {name} gets {NUMBER_WORDS[qty - 1]} {color} {noun}, shipped to {city}."


def _example(rng: random.Random, names: list[str]) -> SyntheticExample:
    name, color, item, city = rng.choice(names), rng.choice(COLORS), rng.choice(ITEMS), rng.choice(CITIES)
    qty = rng.randint(1, 9)
    user = f"order: {qty} x {color} {item} for {name}, ship to {city}"
    return SyntheticExample(
        messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
        answer=teacher_answer(name=name, qty=qty, color=color, item=item, city=city),
    )


def examples(n: int, *, seed: int = 0) -> list[SyntheticExample]:
    """``n`` in-distribution examples, deterministic for a given seed."""
    rng = random.Random(seed)
    return [_example(rng, NAMES) for _ in range(n)]


def out_of_distribution(n: int, *, seed: int = 1) -> list[SyntheticExample]:
    """``n`` examples whose customer names never appear in :func:`examples`."""
    rng = random.Random(seed)
    return [_example(rng, OOD_NAMES) for _ in range(n)]


def seed_ledger(
    ledger: Any,
    route: str,
    items: list[SyntheticExample],
    *,
    teacher_model: str = "synthetic/teacher",
    teacher_logprobs: Any = None,
    start_ts: float | None = None,
) -> None:
    """Insert ``items`` into a :class:`store.Ledger` as successful teacher exchanges.

    ``teacher_logprobs`` is an optional callable ``answer -> list`` of OpenAI logprob entries
    (to simulate a teacher that returned ``top_logprobs``). Timestamps increase one second apart,
    so a split by time keeps the last items for validation.
    """
    t0 = start_ts if start_ts is not None else time.time() - len(items)
    rows = []
    for i, ex in enumerate(items):
        request = {"messages": ex.messages, "model": route, "temperature": 0}
        lp = teacher_logprobs(ex.answer) if teacher_logprobs is not None else None
        rows.append({
            "uid": uuid.uuid4().hex, "ts": t0 + i, "route": route, "key_id": "", "endpoint": "chat.completions",
            "model": route, "teacher_model": teacher_model, "request": json.dumps(request), "answer": ex.answer,
            "finish_reason": "stop", "status": 200, "served_by": "teacher",
            "teacher_logprobs": json.dumps(lp) if lp is not None else None,
            # usage as a provider reports it (about 4 characters a token)
            "prompt_tokens": max(1, sum(len(m["content"]) for m in ex.messages) // 4),
            "completion_tokens": max(1, len(ex.answer) // 4),
        })
    ledger.insert_rows("exchanges", rows)
