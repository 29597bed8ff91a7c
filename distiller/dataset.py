"""A route's training data, from the ledger (or from a JSONL stream) to train/validation examples.

Steps: keep only usable teacher answers (no errors, refusals or truncations) -> learn the route's
static template from its requests and strip it (what varies is what the student sees) -> optionally
scrub personal data -> deduplicate on the normalized varying text, keeping the newest answer -> split:
by time, the newest pairs validating (``val_split = "newest"``), or by a hash of the prompt, a fixed
share of the route's prompts over its whole life (``"holdout"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    "route_examples",
    "weighted_pairs",
    "examples_from_jsonl",
    "normalize_prompt",
    "holdout_share",
    "holdout_fraction",
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

    @property
    def is_check(self) -> bool:
        """A shadow check of a student-served request (it stands for more than itself)."""
        return self.weight > 1.0


@dataclass
class RouteDataset:
    route: str
    template: Template
    train: list[Example]
    val: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    pii_scrub: bool = False
    # Validation pairs older than the plain newest-pairs split, taken to reach config.min_val_checks
    # shadow checks (cascade mode). Validation is then scored out of fold (see distiller.train).
    val_reach_back: int = 0
    # How the validation pairs were chosen (config.val_split): "newest", or "holdout" with the share
    # of the route's distinct prompts held out (see holdout_share).
    val_split: str = "newest"
    holdout_fraction: float | None = None

    @property
    def val_checks(self) -> int:
        """Shadow checks (pairs standing for more than one request) among the validation pairs."""
        return sum(1 for e in self.val if e.is_check)

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
    val_floor_id: int | None = None,
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
    if config.val_split == "holdout":
        fraction = holdout_fraction(len(unique), config)
        held = [holdout_share(e.text) < fraction for e in unique]
        if 0 < sum(held) <= len(unique) - 2:
            return RouteDataset(route=route, template=template, train=[e for e, h in zip(unique, held) if not h],
                                val=[e for e, h in zip(unique, held) if h], dropped=dropped, pii_scrub=config.pii_scrub,
                                val_split="holdout", holdout_fraction=fraction)
    n_val = int(round(len(unique) * config.val_fraction))
    n_val = max(n_val, min(config.min_val_pairs, len(unique) // 2))
    n_val = min(n_val, config.max_val_pairs, len(unique) - 2)
    plain = n_val
    n_val = _reach_back_for_checks(unique, n_val, config.min_val_checks, val_floor_id)
    return RouteDataset(
        route=route,
        template=template,
        train=unique[: len(unique) - n_val],
        val=unique[len(unique) - n_val :],
        dropped=dropped,
        pii_scrub=config.pii_scrub,
        val_reach_back=n_val - plain,
    )


def holdout_share(text: str) -> float:
    """Where a prompt falls in [0, 1): a hash of its normalized varying text (the dedup key), the
    same in every process and every version, so a prompt is held out for validation in all of a
    route's versions or in none."""
    digest = hashlib.blake2b(normalize_prompt(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def holdout_fraction(n: int, config: DistillerConfig) -> float:
    """The share of prompts held out when a route has ``n`` distinct pairs: ``val_fraction``, more
    while ``min_val_pairs`` needs it, less once ``max_val_pairs`` caps it, never over a half.

    It never grows as ``n`` grows, so a prompt held out once stays held out until the cap lets it
    go to training, and no prompt that an earlier version's encoder or scored model trained on is
    validated on later (the certification of every version rests on that; the versions that ship
    are refit on their held-out prompts too, see distiller.train.refit_on_all)."""
    fraction = max(config.val_fraction, config.min_val_pairs / max(n, 1))
    return min(fraction, config.max_val_pairs / max(n, 1), 0.5)


def _reach_back_for_checks(unique: Sequence[Example], n_val: int, min_checks: int, floor_id: int | None) -> int:
    """The validation size that holds ``min_checks`` shadow checks, reaching back from ``n_val``.

    In cascade mode the teacher sees the student's escalations and a sampled few of the requests it
    served; the newest fifth of the pairs then holds a few dozen checks, too few to certify what a
    new version would serve (at 98% with 95% confidence that takes well over a hundred). The split
    reaches back until it holds ``min_checks`` of them, never past half the pairs nor to pairs at or
    before ``floor_id`` (the newest data a reusable fine-tuned encoder was trained on: its scores
    there would be optimistic). Unchanged when the route has no checks (shadow mode, plain logs) or
    already holds enough.
    """
    positions = [i for i, e in enumerate(unique) if e.is_check]
    if min_checks <= 0 or not positions:
        return n_val
    start = positions[-min_checks] if len(positions) >= min_checks else positions[0]
    reach = min(len(unique) - start, len(unique) // 2)
    if floor_id is not None:
        reach = min(reach, sum(1 for e in unique if e.id > floor_id))
    return max(n_val, reach)


def load_route_dataset(ledger: Any, route: str, config: DistillerConfig, *, val_floor_id: int | None = None) -> RouteDataset:
    """The route's dataset from the ledger's successful teacher exchanges (see :func:`build_dataset`)."""
    examples, dropped = route_examples(ledger, route)
    return build_dataset(route, examples, config, dropped=dropped, val_floor_id=val_floor_id)


def route_examples(ledger: Any, route: str) -> tuple[list[Example], dict[str, int]]:
    """The route's usable teacher pairs, oldest first, shadow checks weighted (before template
    stripping and deduplication), and the count of unusable ones by reason."""
    examples: list[Example] = []
    dropped: dict[str, int] = {}
    for pair in weighted_pairs(ledger, route):
        reason = unusable_reason(pair.answer, pair.finish_reason)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        examples.append(
            Example(id=pair.id, ts=pair.ts, messages=pair.messages, answer=pair.answer, logprobs=pair.teacher_logprobs,
                    weight=pair.weight)
        )
    return examples, dropped


def weighted_pairs(ledger: Any, route: str) -> list[Any]:
    """The route's teacher pairs with its shadow checks, oldest first, each weighted by the served
    requests it stands for (:meth:`store.Ledger.teacher_pairs`, then by each check's probability):
    in cascade mode the teacher-answered pairs alone are the live version's escalations, the
    requests it declined, and a curve or a gate read off them describes those, not the traffic."""
    return _weigh_checks_by_probability(list(ledger.teacher_pairs(route, shadow_checks=True)),
                                        ledger.check_probabilities(route))


def _weigh_checks_by_probability(pairs: list[Any], probabilities: dict[int, tuple[int | None, float]]) -> list[Any]:
    """Checks sampled by confidence stand for ``1 / probability`` served requests each.

    The ledger weighs a version's checks alike (its served count over its checks); where the
    gateway recorded each check's probability, that total is shared in proportion to the inverse
    probabilities instead: a check of a confident answer (rarely sampled) stands for more requests
    than one near the threshold. Checks without a probability keep their weight."""
    if not probabilities:
        return pairs
    by_version: dict[Any, list[Any]] = {}
    for pair in pairs:
        if pair.id in probabilities and pair.weight > 1.0:
            by_version.setdefault(probabilities[pair.id][0], []).append(pair)
    weights: dict[int, float] = {}
    for group in by_version.values():
        total = sum(p.weight for p in group)
        inverse = [1.0 / probabilities[p.id][1] for p in group]
        scale = total / sum(inverse)
        weights.update({p.id: max(1.0, inv * scale) for p, inv in zip(group, inverse)})
    return [dataclasses.replace(p, weight=weights[p.id]) if p.id in weights else p for p in pairs]


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
