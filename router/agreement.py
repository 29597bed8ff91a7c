"""Agreement: whether a student's answer counts as the teacher's. The product's core number, defined once.

Validation curves, the promotion gate, shadow checks, the drift monitor, the dashboard and the
benches all call :func:`answers_agree`, so the figure a version is certified on is the figure it is
monitored on. An answer is compared as its route's kind of answer:

- ``label``: a class name. Equal after folding case and collapsing whitespace
  (``"Refund_Request "`` agrees with ``"refund_request"``).
- ``json``: a JSON object or value (structured and extraction routes). Equal as parsed JSON: key
  order, spacing and number spelling are formatting (``{"a": 1, "b": 2}`` agrees with
  ``{"b":2,"a":1.0}``); strings compare exactly, case included, since an extracted value is data.
  An answer that does not parse agrees with nothing.
- ``text``: free text. Equal after Unicode NFKC normalisation, case folding and whitespace
  collapse. Semantic similarity is not agreement: two answers that mean the same may differ, but a
  router cannot tell which differences matter, so a long free-text answer agrees only when it says
  the same thing the same way. (Similarity is reported beside agreement where it helps, never in
  its place.)
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

__all__ = ["KINDS", "answers_agree", "canonical", "agreement_kind"]

KINDS = ("label", "json", "text")
_WS = re.compile(r"\s+")
_INVALID = object()


def agreement_kind(student_kind: str, answer_format: str | None = None) -> str:
    """The agreement kind of a student kind: label students answer labels, structured students JSON,
    LM students JSON or text (their artifact's ``answer_format``)."""
    if student_kind == "label":
        return "label"
    if student_kind == "structured":
        return "json"
    if student_kind in KINDS:
        return student_kind
    return "json" if answer_format == "json" else "text"


def _json_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID
    return _numbers_equal(value)


def _numbers_equal(value: Any) -> Any:
    """Ints and floats of the same value compare equal already (1 == 1.0); booleans must not equal
    numbers (Python's True == 1), and NaN must equal itself, so both are tagged."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, dict):
        return {k: _numbers_equal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_equal(v) for v in value]
    return value


def canonical(kind: str, text: str | None) -> Any:
    """The form answers of ``kind`` are compared in (None for no answer; for ``json``, the parsed
    value, or a marker that equals nothing when the text does not parse)."""
    if text is None:
        return None
    if kind == "label":
        return _WS.sub(" ", text.strip()).casefold()
    if kind == "json":
        return _json_value(text)
    if kind == "text":
        return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    raise ValueError(f"unknown agreement kind {kind!r}; known: {', '.join(KINDS)}")


def answers_agree(kind: str, student: str | None, teacher: str | None) -> bool:
    """Whether ``student`` counts as ``teacher``'s answer for a route whose answers are ``kind``."""
    if student is None or teacher is None:
        return False
    a, b = canonical(kind, student), canonical(kind, teacher)
    return a is not _INVALID and b is not _INVALID and a == b
