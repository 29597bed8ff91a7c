"""A route's training data, from the ledger (or from a JSONL stream) to train/validation examples.

Steps: keep only usable teacher answers (no errors, refusals or truncations) -> learn the route's
static template from its requests and strip it (what varies is what the student sees) -> optionally
scrub personal data -> deduplicate on the normalized varying text, keeping the newest answer -> split
by time, the newest pairs validating, as production would see them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distiller.config import DistillerConfig
from distiller.pii import scrub
from router.template import Template, learn_template

log = logging.getLogger(__name__)

__all__ = [
    "Example",
    "RouteDataset",
    "NotEnoughData",
    "unusable_reason",
    "build_dataset",
    "load_route_dataset",
    "examples_from_jsonl",
    "normalize_prompt",
]


class NotEnoughData(Exception):
    """A route has too few usable teacher pairs to train a student."""

    def __init__(self, route: str, have: int, need: int, detail: str = ""):
        self.route, self.have, self.need = route, have, need
        super().__init__(
            f"Route {route!r} has {have} usable teacher pair(s); a student needs at least {need}. "
            f"{detail}No student was trained; the teacher keeps answering and logging."
        )


@dataclass
class Example:
    """One teacher pair as the student trains on it."""

    id: int  # exchange id (stream position for JSONL streams); the time order
    messages: list[dict[str, Any]]
    answer: str
    logprobs: list[dict[str, Any]] | None = None
    ts: float = 0.0
    text: str = ""  # the varying text, after template stripping (and PII scrubbing)
    weight: float = 1.0  # requests of the traffic this pair stands for (see Ledger.teacher_pairs)


@dataclass
class RouteDataset:
    route: str
    template: Template
    train: list[Example]
    val: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    pii_scrub: bool = False

    @property
    def examples(self) -> list[Example]:
        return self.train + self.val


_REFUSAL = re.compile(
    r"^\s*(?:I'?m sorry|I am sorry|Sorry, (?:but )?I|I can(?:no|')t|I cannot|I won'?t|I am unable|I'?m unable|"
    r"As an AI|I apologi[sz]e)",
    re.IGNORECASE,
)


def unusable_reason(answer: str | None, finish_reason: str | None) -> str | None:
    """Why a teacher answer must not be learned from ('empty', 'truncated', 'filtered', 'refusal'), or None."""
    if answer is None or not answer.strip():
        return "empty"
    if finish_reason == "length":
        return "truncated"
    if finish_reason == "content_filter":
        return "filtered"
    if _REFUSAL.match(answer):
        return "refusal"
    return None


def normalize_prompt(text: str) -> str:
    """The dedup key of a request's varying text: case and whitespace do not make a new prompt."""
    return " ".join(text.split()).lower()


def build_dataset(
    route: str,
    examples: Sequence[Example],
    config: DistillerConfig,
    *,
    template: Template | None = None,
    dropped: dict[str, int] | None = None,
) -> RouteDataset:
    """Strip, scrub, deduplicate and split ``examples`` (any order; sorted by id here).

    Raises :class:`NotEnoughData` when fewer than ``config.min_pairs`` distinct pairs remain.
    """
    dropped = dict(dropped or {})
    ordered = sorted(examples, key=lambda e: e.id)
    if template is None:
        template = learn_template([e.messages for e in ordered])
    latest: dict[str, Example] = {}
    for e in ordered:
        text = template.strip(e.messages)
        if config.pii_scrub:
            text = scrub(text)
        e.text = text
        key = normalize_prompt(text)
        if key in latest:
            dropped["duplicate"] = dropped.get("duplicate", 0) + 1
        latest[key] = e  # the newest answer to a prompt is the teacher's current behaviour
    unique = sorted(latest.values(), key=lambda e: e.id)
    if len(unique) < config.min_pairs:
        detail = ""
        if dropped:
            detail = "Dropped: " + ", ".join(f"{v} {k}" for k, v in sorted(dropped.items())) + ". "
        raise NotEnoughData(route, len(unique), config.min_pairs, detail)
    n_val = int(round(len(unique) * config.val_fraction))
    n_val = max(n_val, min(config.min_val_pairs, len(unique) // 2))
    n_val = min(n_val, config.max_val_pairs, len(unique) - 2)
    return RouteDataset(
        route=route,
        template=template,
        train=unique[: len(unique) - n_val],
        val=unique[len(unique) - n_val :],
        dropped=dropped,
        pii_scrub=config.pii_scrub,
    )


def load_route_dataset(ledger: Any, route: str, config: DistillerConfig) -> RouteDataset:
    """The route's dataset from the ledger's successful teacher exchanges (see :func:`build_dataset`)."""
    examples: list[Example] = []
    dropped: dict[str, int] = {}
    for pair in ledger.teacher_pairs(route, shadow_checks=True):
        reason = unusable_reason(pair.answer, pair.finish_reason)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        examples.append(
            Example(id=pair.id, ts=pair.ts, messages=pair.messages, answer=pair.answer, logprobs=pair.teacher_logprobs,
                    weight=pair.weight)
        )
    return build_dataset(route, examples, config, dropped=dropped)


def examples_from_jsonl(path: str | Path, *, limit: int | None = None) -> list[Example]:
    """A request stream in the datasets' format (one ``{"messages", "answer"}`` per line), in order.

    Optional per-line ``logprobs`` (OpenAI ``logprobs.content``) and ``finish_reason`` are honoured.
    """
    out: list[Example] = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if unusable_reason(row.get("answer"), row.get("finish_reason")):
                continue
            out.append(
                Example(id=i, messages=row["messages"], answer=row["answer"], logprobs=row.get("logprobs"), ts=float(i))
            )
    return out
