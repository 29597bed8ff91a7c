"""The store's value types and errors: what its read methods return and what they raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Pair", "StudentRefused", "StoreError", "SchemaTooNew"]


class StoreError(Exception):
    """The store cannot be used: unreachable, unreadable, or not kdgate's."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer kdgate; this one does not know its schema."""


@dataclass(frozen=True)
class Pair:
    """One logged teacher exchange, as the distiller sees it."""

    id: int
    ts: float
    route: str
    messages: list[dict[str, Any]]
    answer: str
    finish_reason: str | None
    teacher_logprobs: list[dict[str, Any]] | None
    served_by: str
    # How many requests of the route's traffic this pair stands for: 1 for everything the teacher
    # answered (all of it is logged), 1/sampling rate for a shadow check of a student answer.
    weight: float = 1.0


class StudentRefused(Exception):
    """A student version cannot be made live: it does not exist, or its artifact failed verification."""

