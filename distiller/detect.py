"""Task detection: is a route's answer a label, a JSON object of categorical fields, or free text?

- label: the answers (normalized for whitespace and case) come from a small set, most of them seen
  more than once. The student answers in the teacher's most common spelling of each label.
- structured: every answer is a JSON object and each field is categorical. One head per field; the
  student re-serializes in the teacher's key order and spacing.
- free_text: anything else; left to the LM student. The reason is recorded for the dashboard.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distiller.config import DistillerConfig
from router.label_student import ABSENT, dumps_in_format

__all__ = ["Detection", "detect_task", "label_key", "ABSENT", "detect_json_format", "field_value_label",
           "soft_label_distribution"]



def label_key(answer: str) -> str:
    """The identity of a label answer: whitespace and case do not make a new label."""
    return " ".join(answer.split()).lower()


def field_value_label(value: Any) -> str:
    """The class of one structured field's value (its canonical JSON, so types survive)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass
class Detection:
    kind: str  # "label" | "structured" | "free_text"
    reason: str
    # label: key -> the teacher's most common spelling
    surfaces: dict[str, str] = field(default_factory=dict)
    # structured: field names in the teacher's order, and the json.dumps arguments that reproduce it
    fields: list[str] = field(default_factory=list)
    json_format: dict[str, Any] = field(default_factory=dict)
    format_match: float = 0.0  # share of answers the format reproduces byte for byte

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "reason": self.reason,
            "labels": len(self.surfaces),
            "fields": self.fields,
            "json_format": self.json_format,
            "format_match": self.format_match,
        }


def _categorical(classes: Sequence[str], config: DistillerConfig) -> tuple[bool, str]:
    counts = Counter(classes)
    if len(counts) > config.max_labels:
        return False, f"{len(counts)} distinct answers (more than max_labels={config.max_labels})"
    repeated = sum(c for c in counts.values() if c >= 2) / max(1, len(classes))
    if repeated < config.min_repeated_share:
        return False, (
            f"only {repeated:.0%} of answers repeat an earlier one "
            f"(min_repeated_share={config.min_repeated_share:.0%})"
        )
    return True, f"{len(counts)} distinct answers, {repeated:.0%} repeated"


_FORMATS: list[dict[str, Any]] = [
    {"separators": [", ", ": "], "indent": None},
    {"separators": [",", ":"], "indent": None},
    {"separators": [",", ": "], "indent": None},
    {"separators": [", ", ":"], "indent": None},
    {"separators": [",", ": "], "indent": 2},
    {"separators": [",", ": "], "indent": 4},
    {"separators": [",", ": "], "indent": "\t"},
]


def detect_json_format(raw: Sequence[str], objs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """The json.dumps arguments (separators, indent, ensure_ascii) that reproduce most answers exactly."""
    best, best_hits = dict(_FORMATS[0], ensure_ascii=False), -1
    for fmt in _FORMATS:
        for ensure_ascii in (False, True):
            cand = dict(fmt, ensure_ascii=ensure_ascii)
            hits = sum(1 for r, o in zip(raw, objs) if dumps_in_format(o, cand) == r.strip())
            if hits > best_hits:
                best, best_hits = cand, hits
    return best, best_hits / max(1, len(raw))


def detect_task(answers: Sequence[str], config: DistillerConfig) -> Detection:
    """Decide the route's kind from its teacher answers (already filtered for refusals etc.)."""
    if not answers:
        return Detection(kind="free_text", reason="no answers")
    objs: list[dict[str, Any]] = []
    for a in answers:
        try:
            v = json.loads(a)
        except ValueError:
            break
        if not isinstance(v, dict):
            break
        objs.append(v)
    if len(objs) == len(answers):
        return _detect_structured(answers, objs, config)

    if max(len(a.strip()) for a in answers) > config.max_label_chars:
        longest = max(len(a.strip()) for a in answers)
        return Detection(kind="free_text", reason=f"answers up to {longest} characters long (labels are at most "
                         f"max_label_chars={config.max_label_chars})")
    keys = [label_key(a) for a in answers]
    ok, why = _categorical(keys, config)
    if not ok:
        return Detection(kind="free_text", reason=why)
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    for a, k in zip(answers, keys):
        spellings[k][a.strip()] += 1
    surfaces = {k: c.most_common(1)[0][0] for k, c in spellings.items()}
    return Detection(kind="label", reason=why, surfaces=surfaces)


def _detect_structured(answers: Sequence[str], objs: list[dict[str, Any]], config: DistillerConfig) -> Detection:
    positions: dict[str, list[float]] = defaultdict(list)
    for o in objs:
        keys = list(o)
        for i, k in enumerate(keys):
            positions[k].append(i / max(1, len(keys) - 1) if len(keys) > 1 else 0.0)
    if not positions:
        return Detection(kind="free_text", reason="answers are empty JSON objects")
    # Teacher's field order: by mean relative position, ties by first appearance.
    first_seen = {k: i for i, k in enumerate(dict.fromkeys(k for o in objs for k in o))}
    fields = sorted(positions, key=lambda k: (sum(positions[k]) / len(positions[k]), first_seen[k]))
    reasons = []
    for f in fields:
        values = []
        for o in objs:
            if f not in o:
                values.append(ABSENT)
            elif isinstance(o[f], (dict, list)) and len(json.dumps(o[f])) > config.max_label_chars:
                return Detection(kind="free_text", reason=f"JSON field {f!r} holds long nested values")
            else:
                values.append(field_value_label(o[f]))
        if any(len(v) > config.max_label_chars for v in values):
            return Detection(kind="free_text", reason=f"JSON field {f!r} holds long text (not categorical)")
        ok, why = _categorical(values, config)
        if not ok:
            return Detection(kind="free_text", reason=f"JSON field {f!r} is not categorical: {why}")
        reasons.append(f"{f}: {why}")
    ordered = [{k: o[k] for k in fields if k in o} for o in objs]
    fmt, match = detect_json_format(answers, ordered)
    return Detection(
        kind="structured",
        reason=f"JSON objects with {len(fields)} categorical field(s) ({'; '.join(reasons)})",
        fields=fields,
        json_format=fmt,
        format_match=match,
    )


def soft_label_distribution(
    logprobs: list[dict[str, Any]] | None, answer_key: str, label_keys: Sequence[str]
) -> dict[str, float] | None:
    """The teacher's probability on each label, from the top_logprobs of the answer's first token.

    A top token maps to the labels whose normalized text starts with it. Mass on a token that
    starts the teacher's own answer goes to that answer (only the first token is known, so the
    teacher's choice within a shared prefix is kept); mass on a token that starts exactly one other
    label goes to that label; mass on tokens matching several other labels is split evenly; mass on
    tokens matching no label is dropped. Returns None when there is nothing usable.
    """
    if not logprobs:
        return None
    first = logprobs[0] if isinstance(logprobs, list) and logprobs else None
    if not isinstance(first, dict):
        return None
    tops = first.get("top_logprobs") or [{"token": first.get("token", ""), "logprob": first.get("logprob", 0.0)}]
    dist: dict[str, float] = defaultdict(float)
    seen_tokens = set()
    for top in tops:
        token = label_key(str(top.get("token", "")))
        if not token or token in seen_tokens:
            continue
        seen_tokens.add(token)
        try:
            p = math.exp(float(top.get("logprob", -math.inf)))
        except (TypeError, ValueError):
            continue
        if answer_key.startswith(token):
            dist[answer_key] += p
            continue
        matches = [k for k in label_keys if k.startswith(token)]
        for k in matches:
            dist[k] += p / len(matches)
    total = sum(dist.values())
    if total <= 0 or answer_key not in dist:
        return None
    return {k: v / total for k, v in dist.items()}
