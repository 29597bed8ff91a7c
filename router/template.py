"""A route's static prompt template: learned from its logged requests, stripped from each request.

Most routes send the same instructions on every call (a system prompt, an instruction wrapped around
the user's text, a few-shot block) and only a few words vary. The student should embed those words,
not a 600-token preamble that is identical everywhere. :func:`learn_template` finds, for each message
slot of the route's usual request shape, whether the slot is static (same content on nearly every
request) or varying; for a varying slot it finds the prefix and suffix nearly every request shares
(so text in the middle of a template is found too). :meth:`Template.strip` returns what varies.

Pure Python and JSON-serialisable; the gateway uses it on the hot path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.text import message_text

__all__ = ["Template", "Slot", "learn_template", "message_text", "scrub_pii"]

Messages = Sequence[dict[str, Any]]


@dataclass
class Slot:
    """One message position of the route's usual request shape."""

    role: str
    static: str | None = None  # the content when the slot is the same on (nearly) every request
    prefix: str = ""  # for a varying slot: the leading text (nearly) every request shares
    suffix: str = ""  # ... and the trailing text

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "static": self.static, "prefix": self.prefix, "suffix": self.suffix}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Slot:
        return cls(role=d["role"], static=d.get("static"), prefix=d.get("prefix", ""), suffix=d.get("suffix", ""))


@dataclass
class Template:
    """What is static in a route's requests. An empty template strips nothing."""

    slots: list[Slot] = field(default_factory=list)
    samples: int = 0  # how many requests it was learned from

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"slots": [s.to_dict() for s in self.slots], "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Template:
        if not d:
            return cls()
        return cls(slots=[Slot.from_dict(s) for s in d.get("slots", [])], samples=int(d.get("samples", 0)))

    def fingerprint(self) -> str:
        """A stable hash of the static parts: equal templates strip requests identically."""
        body = json.dumps([s.to_dict() for s in self.slots], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def static_chars(self) -> int:
        """How many characters of a typical request the template accounts for."""
        return sum(len(s.static or "") + len(s.prefix) + len(s.suffix) for s in self.slots)

    # -- stripping ----------------------------------------------------------------------------
    def strip(self, messages: Messages) -> str:
        """What varies in one request: its non-template text, varying messages joined by newlines.

        A request of the learned shape is stripped slot by slot. A request of another shape (an
        extra turn, a missing system prompt) still loses every message equal to a static slot, and
        the shared prefix/suffix of a varying slot with the same role where it is present.
        """
        roles = [str(m.get("role", "")) for m in messages]
        texts = [message_text(m) for m in messages]
        if self.slots and roles == [s.role for s in self.slots]:
            parts = [
                _cut(text, slot.prefix, slot.suffix)
                for slot, text in zip(self.slots, texts)
                if slot.static is None or text != slot.static
            ]
        else:
            statics = {(s.role, s.static) for s in self.slots if s.static is not None}
            varying = {}
            for s in self.slots:
                if s.static is None:
                    varying.setdefault(s.role, s)
            parts = []
            for role, text in zip(roles, texts):
                if (role, text) in statics:
                    continue
                slot = varying.get(role)
                parts.append(_cut(text, slot.prefix, slot.suffix) if slot else text)
        return "\n".join(p for p in (q.strip() for q in parts) if p)


def _cut(text: str, prefix: str, suffix: str) -> str:
    if prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    if suffix and text.endswith(suffix) and len(text) >= len(suffix):
        text = text[: len(text) - len(suffix)]
    return text


def _shared_prefix(texts: Sequence[str], support: float) -> str:
    """The longest prefix that at least ``support`` of ``texts`` start with, ending at a word edge.

    Grown one character at a time following the majority, so a few odd requests do not shrink it.
    """
    n = len(texts)
    if n == 0:
        return ""
    need = max(1, int(support * n + 0.999999))
    alive = list(range(n))
    k = 0
    while True:
        counts = Counter(texts[i][k] for i in alive if len(texts[i]) > k)
        if not counts:
            break
        ch, cnt = counts.most_common(1)[0]
        if cnt < need:
            break
        alive = [i for i in alive if len(texts[i]) > k and texts[i][k] == ch]
        k += 1
    if k == 0:
        return ""
    prefix = texts[alive[0]][:k]
    # Never end inside a word: "Text: gr|eat" and "Text: gr|im" share "Text: gr", the template is "Text: ".
    full_word_end = all(len(texts[i]) == k or not texts[i][k].isalnum() for i in alive)
    if prefix[-1].isalnum() and not full_word_end:
        j = k
        while j > 0 and prefix[j - 1].isalnum():
            j -= 1
        prefix = prefix[:j]
    # A prefix that is the whole text of most requests is not a wrapper; leave something to embed.
    if sum(1 for t in texts if len(t) <= len(prefix)) > n - need:
        return ""
    return prefix


def learn_template(
    requests: Sequence[Messages], *, support: float = 0.9, min_requests: int = 5
) -> Template:
    """Learn a route's static template from its logged requests (each a list of chat messages).

    A slot is static when at least ``support`` of the requests have the same content there; a
    varying slot keeps the prefix and suffix that ``support`` of them share. With fewer than
    ``min_requests`` requests nothing can be told apart from chance, so nothing is treated as static.
    """
    requests = [list(r) for r in requests]
    if not requests:
        return Template()
    shapes = Counter(tuple(str(m.get("role", "")) for m in r) for r in requests)
    shape, _ = shapes.most_common(1)[0]
    same = [r for r in requests if tuple(str(m.get("role", "")) for m in r) == shape]
    if len(same) < min_requests:
        return Template(slots=[Slot(role=r) for r in shape], samples=len(same))
    slots = []
    for idx, role in enumerate(shape):
        texts = [message_text(r[idx]) for r in same]
        content, count = Counter(texts).most_common(1)[0]
        if count >= support * len(texts) and len(set(texts)) < len(texts):
            slots.append(Slot(role=role, static=content))
            continue
        prefix = _shared_prefix(texts, support)
        rest = [t[len(prefix) :] if t.startswith(prefix) else t for t in texts]
        suffix = _shared_prefix([t[::-1] for t in rest], support)[::-1]
        slots.append(Slot(role=role, prefix=prefix, suffix=suffix))
    # If every slot is static, the route's requests do not vary by shape; keep the most varying
    # slot (the last user turn) as the one to embed rather than stripping everything.
    if all(s.static is not None for s in slots):
        for s in reversed(slots):
            if s.role == "user":
                s.static = None
                break
    return Template(slots=slots, samples=len(same))


# -- personal data ----------------------------------------------------------------------------
# Scrubbing lives here, beside stripping, because both define what a student sees: the distiller
# scrubs what it trains on and the runtime scrubs the same way before embedding.

# Every pattern runs in linear time on any input (the issue-18 finding was an email pattern with an
# unbounded local part, quadratic on "a." * n: 6 s for 40 kB, with the event loop frozen): each
# starts only where the run it belongs to starts (a lookbehind), and every repetition is bounded, so
# no position is scanned more than a fixed number of times. tests/router/test_template.py times
# each on 1 MB of adversarial text.
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}\b")
# 13-19 digits, optionally grouped by spaces or dashes (card-like); checked before phones.
_CARD = re.compile(r"(?<![\w])(?:\d[ -]?){12,18}\d(?!\w)")
# International or national phone numbers: optional +, 7-15 digits with common separators.
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?!\w)")
PATTERNS = {"email": _EMAIL, "card": _CARD, "phone": _PHONE}

# Text beyond this is cut before scrubbing (and so never reaches a student): a student reads the
# first few hundred tokens of a request, and the cap bounds the work a single request can cause.
MAX_SCRUB_CHARS = 65_536


_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def _is_phone(match: re.Match[str]) -> bool:
    value = match.group(0)
    if _DATE.match(value):  # dates look like short phone numbers; they are not personal data
        return False
    digits = sum(ch.isdigit() for ch in value)
    return 7 <= digits <= 15


def scrub_pii(text: str) -> str:
    """``text`` (its first MAX_SCRUB_CHARS characters) with emails, card-like numbers and phone
    numbers replaced by placeholders."""
    text = text[:MAX_SCRUB_CHARS]
    if "@" in text:
        text = _EMAIL.sub("[EMAIL]", text)
    text = _CARD.sub("[CARD]", text)
    return _PHONE.sub(lambda m: "[PHONE]" if _is_phone(m) else m.group(0), text)
