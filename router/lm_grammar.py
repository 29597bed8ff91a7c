"""The answer grammar of a structured LM student: a JSON route's answers as keys, labels and spans.

An extraction route answers with flat JSON objects whose values are either

- **enum**: one of a small closed set of values seen in the answers (``"intent": "PlayMusic"``,
  ``"urgent": true``), or
- **copy**: words of the request itself (``"artist": "miles davis"``), a list when the key repeats.

The student never writes JSON text. After the request it writes a short sequence of ids, in one of
two orders (the schema's ``order``)::

    key_first:    [V:intent=PlayMusic]  [K:artist] ' miles' ' davis' [END]  [K:service] ' spotify' [END]  EOS
    value_first:  [V:intent=PlayMusic]  ' miles' ' davis' [K:artist]  ' spotify' [K:service]  EOS

``[K:key]``, ``[V:key=value]`` and ``[END]`` are *extra tokens*: ids after the base vocabulary with their
own trained embeddings. A copied value is the request's own token ids. Key first is how JSON is
written: the span's extent is decided knowing what it is, so a track is not run on into the artist
after it. Value first (the only order of artifacts written before key first) chooses the key once the
span has been read. A schema of order ``both`` (the default for new students) is trained on both and
answers each request both ways, as two *views* told apart by what ends the prompt (SEP for value first,
the extra token ``[KF]`` for key first); :func:`router.lm_decode.decode_batch` keeps the likelier
answer and whether the views agreed, a confidence signal no single decode has.

:class:`Grammar` gives the ids allowed at every step; every sequence it allows maps to a JSON object of
the route's shape (:meth:`Grammar.to_json`), so the answer is valid JSON by construction and never
re-parsed.

The schema (:class:`RouteSchema`) is learned from the route's answers by the distiller
(:func:`distiller.lm.structured.induce_schema`) and shipped in the artifact; this module is what the
gateway and the distiller share: the rules, the encoding of an answer, and the decoded object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RouteSchema", "Request", "Grammar", "GrammarState", "encode_answer", "value_text", "ORDERS",
           "SCHEMA_ORDERS"]

ORDERS = ("key_first", "value_first")  # where a copied span's key goes: before the span, or after it
SCHEMA_ORDERS = (*ORDERS, "both")  # a schema's order: one of them, or both (two views of each answer)


def value_text(value: Any) -> str:
    """An enum value's identity (its JSON text), so ``true``, ``1`` and ``"1"`` stay apart."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@dataclass
class RouteSchema:
    """Keys and value kinds of a structured route.

    ``keys`` in first-seen order; ``enum_values[k]``: a key's values as JSON texts (enum keys only);
    ``first_key``: the key every answer starts with, or None; ``list_keys``: keys seen with a list
    value (only these may repeat); ``monotone``: copied spans follow request order (a span may start
    only after the previous one ends); ``required``: keys of every answer (the end is allowed once
    they are out); ``keys_given``: the keys seen with each value of an enum first key (after it, only
    those may come); ``prefix_ids``: fed before the request (a BOS the base expects); ``sep_id``: ends
    the request; ``json_format``: the ``json.dumps`` arguments that reproduce the teacher's spacing;
    ``order``: ``key_first`` (a copy key, its span, then ``[END]``), ``value_first`` (the span, then
    its key; artifacts written before key first are read as it) or ``both`` (:attr:`views`).
    """

    keys: list[str]
    enum_values: dict[str, list[str]]
    first_key: str | None
    list_keys: set[str]
    monotone: bool
    base_vocab: int
    sep_id: int
    required: list[str] = field(default_factory=list)
    always_list: list[str] = field(default_factory=list)  # list keys whose value is a list even when single
    prefix_ids: list[int] = field(default_factory=list)
    json_format: dict[str, Any] = field(default_factory=dict)
    coverage: float = 1.0  # share of the training answers the schema represents exactly
    stats: dict[str, Any] = field(default_factory=dict)
    # the keys seen with each value of the first key (an intent's slots): after it, only those; empty: any
    keys_given: dict[str, list[str]] = field(default_factory=dict)
    order: str = "value_first"

    def __post_init__(self) -> None:
        if self.order not in SCHEMA_ORDERS:
            raise ValueError(f"unknown answer order {self.order!r} (want one of {', '.join(SCHEMA_ORDERS)})")
        # extra-token layout (ids from base_vocab on): one per key, one per (enum key, value), EOS; with
        # key first the end of a span; with both orders the token that asks for key first
        self.key_id = {k: self.base_vocab + i for i, k in enumerate(self.keys)}
        nxt = self.base_vocab + len(self.keys)
        self.enum_id: dict[tuple[str, str], int] = {}
        for k in self.keys:
            for v in self.enum_values.get(k, []):
                self.enum_id[(k, v)] = nxt
                nxt += 1
        self.eos_id = nxt
        self.end_id = nxt + 1 if self.order != "value_first" else None
        self.key_first_id = nxt + 2 if self.order == "both" else None
        self.n_extra = (self.key_first_id or self.end_id or self.eos_id) + 1 - self.base_vocab
        self.id_key = {i: k for k, i in self.key_id.items()}
        self.id_enum = {i: kv for kv, i in self.enum_id.items()}
        self.copy_keys = [k for k in self.keys if k not in self.enum_values]

    def extra_token_names(self) -> list[str]:
        """Readable names of the extra tokens in id order (their embeddings start as these words')."""
        labels = []
        for (_, v) in sorted(self.enum_id, key=self.enum_id.get):
            value = json.loads(v)
            labels.append(value if isinstance(value, str) else v)
        return [*self.keys, *labels, "<eos>", *(["<end>"] if self.end_id is not None else []),
                *(["<key-first>"] if self.key_first_id is not None else [])]

    @property
    def views(self) -> list[str]:
        """The orders each request is answered in: one, or for ``both`` key first then value first
        (the first wins a tie)."""
        return ["key_first", "value_first"] if self.order == "both" else [self.order]

    def prompt(self, req: "Request", view: str | None = None) -> list[int]:
        """What the student reads before answering ``req`` in ``view`` (default: the first): the prefix,
        the request, and SEP, or ``[KF]`` where the schema has both orders and key first is asked for."""
        view = view or self.views[0]
        end = self.key_first_id if view == "key_first" and self.key_first_id is not None else self.sep_id
        return [*self.prefix_ids, *req.ids, end]

    def to_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "enum_values": self.enum_values, "first_key": self.first_key,
                "list_keys": sorted(self.list_keys), "monotone": self.monotone, "base_vocab": self.base_vocab,
                "sep_id": self.sep_id, "required": self.required, "always_list": self.always_list, "prefix_ids": self.prefix_ids,
                "json_format": self.json_format, "coverage": self.coverage, "stats": self.stats,
                "keys_given": self.keys_given, "order": self.order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouteSchema":
        known = {"keys", "enum_values", "first_key", "list_keys", "monotone", "base_vocab", "sep_id", "required", "always_list",
                 "prefix_ids", "json_format", "coverage", "stats", "keys_given", "order"}
        body = {k: v for k, v in d.items() if k in known}
        body["list_keys"] = set(body.get("list_keys") or [])
        return cls(**body)


def _boundary(left: str, right: str) -> bool:
    """A word boundary between two characters: whitespace or punctuation on either side."""
    return not (left.isalnum() and right.isalnum())


@dataclass
class Request:
    """A tokenised request (``" " + text``) with, per token, whether a word starts or ends there."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]  # character offsets into " " + text
    starts: list[bool]
    ends: list[bool]

    @classmethod
    def make(cls, tokenizer: Any, text: str) -> "Request":
        s = " " + text
        enc = tokenizer(s, return_offsets_mapping=True, add_special_tokens=False)
        ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        starts, ends = [], []
        for a, b in offs:
            core = s[a:b]
            lead = a + (len(core) - len(core.lstrip()))  # the token's first visible character
            starts.append(bool(core.strip()) and (lead == 0 or _boundary(s[lead - 1], s[lead])))
            ends.append(b >= len(s) or _boundary(s[b - 1], s[b]))
        return cls(text, ids, offs, starts, ends)

    def span_text(self, i: int, j: int) -> str:
        """The text of tokens ``[i, j)`` without surrounding whitespace."""
        return (" " + self.text)[self.offsets[i][0]:self.offsets[j - 1][1]].strip()

    def find_span(self, value: str, min_start: int = 0) -> tuple[int, int] | None:
        """A word-aligned token span whose text is ``value``, preferring one at or after ``min_start``."""
        best = None
        for i in range(len(self.ids)):
            if not self.starts[i]:
                continue
            for j in range(i + 1, len(self.ids) + 1):
                if self.ends[j - 1] and self.span_text(i, j) == value:
                    if i >= min_start:
                        return (i, j)
                    best = best or (i, j)
                    break
        return best


def _values(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def encode_answer(schema: RouteSchema, req: Request, answer: str | dict[str, Any], view: str | None = None,
                  ) -> tuple[list[int], bool] | None:
    """The ids a student writes for ``answer`` in ``view`` (default: the schema's first; EOS last), and
    whether its spans follow request order; None when the answer is outside the schema (an unknown key
    or value, a value not in the request)."""
    key_first = (view or schema.views[0]) == "key_first"
    try:
        obj = json.loads(answer) if isinstance(answer, str) else answer
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    out: list[int] = []
    pos, in_order = 0, True
    for k, v in obj.items():
        if k not in schema.key_id or (isinstance(v, list) and k not in schema.list_keys):
            return None
        if isinstance(v, list) and not v:
            return None
        for x in _values(v):
            if k in schema.enum_values:
                tid = schema.enum_id.get((k, value_text(x)))
                if tid is None:
                    return None
                out.append(tid)
                continue
            if not isinstance(x, str):
                return None
            span = req.find_span(x, pos)
            if span is None:
                return None
            in_order = in_order and span[0] >= pos
            if key_first:
                out += [schema.key_id[k], *req.ids[span[0]:span[1]], schema.end_id]
            else:
                out += [*req.ids[span[0]:span[1]], schema.key_id[k]]
            pos = span[1]
    out.append(schema.eos_id)
    return out, in_order


@dataclass
class GrammarState:
    """Where a decode is: ``start``, ``item`` (a value, a span's first token or the end; key first: a
    value, a copy key or the end), ``first`` (key first: the span's first token, its key chosen),
    ``copy`` (continue the span, or end it: with its key, or key first with ``[END]``) or ``done``."""

    phase: str = "start"
    matches: list[int] = field(default_factory=list)  # span start positions consistent with the span so far
    length: int = 0
    min_start: int = 0
    used: list[str] = field(default_factory=list)
    items: list[tuple[str, Any]] = field(default_factory=list)
    key: str | None = None  # key first: the copy key whose span is being written


class Grammar:
    """The ids allowed at each step for one request under a :class:`RouteSchema`, in one ``view``
    (default: the schema's first); shared by training (which steps are decisions, over which ids) and
    decoding."""

    def __init__(self, schema: RouteSchema, req: Request, view: str | None = None):
        self.s = schema
        self.req = req
        self.view = view or schema.views[0]
        if self.view not in schema.views:
            raise ValueError(f"a schema of order {schema.order!r} has no {self.view!r} view")
        self.key_first = self.view == "key_first"

    def _open(self, st: GrammarState, k: str) -> bool:
        """Whether key ``k`` may come next: not used yet (or a list key), and seen in the training answers
        with the first key's value (``keys_given``), when the schema has that."""
        if k in st.used and k not in self.s.list_keys:
            return False
        if self.s.keys_given and st.items and st.items[0][0] == self.s.first_key:
            given = self.s.keys_given.get(value_text(st.items[0][1]))
            return given is None or k in given
        return True

    def _eos(self, st: GrammarState) -> list[int]:
        return [self.s.eos_id] if all(k in st.used for k in self.s.required) else []

    def _labels(self, st: GrammarState, keys: Sequence[str]) -> list[int]:
        return [self.s.enum_id[(k, v)] for k in keys if k in self.s.enum_values and self._open(st, k)
                for v in self.s.enum_values[k]]

    def _starts(self, st: GrammarState) -> list[int]:
        """The first tokens a span may start with (value first: only while a copy key is open to end it)."""
        if not self.key_first and not any(self._open(st, k) for k in self.s.copy_keys):
            return []  # a span needs a key to end it
        r = self.req
        lo = st.min_start if self.s.monotone else 0
        return list(dict.fromkeys(r.ids[i] for i in range(lo, len(r.ids)) if r.starts[i]))

    def _copy_keys(self, st: GrammarState) -> list[int]:
        """Key first: the copy keys that may open a span here (an open key, and a word left to copy)."""
        if not self._starts(st):
            return []
        return [self.s.key_id[k] for k in self.s.copy_keys if self._open(st, k)]

    def allowed(self, st: GrammarState) -> list[int]:
        """The ids allowed in state ``st`` (empty only when done)."""
        s, r = self.s, self.req
        key_first = self.key_first
        if st.phase == "start" and s.first_key is not None and s.first_key in s.enum_values:
            return self._labels(st, [s.first_key])
        if st.phase in ("start", "item"):
            spans = self._copy_keys(st) if key_first else self._starts(st)
            return self._labels(st, s.keys) + spans + self._eos(st) or [s.eos_id]
        if st.phase == "first":
            return self._starts(st)
        if st.phase == "copy":
            out = list(dict.fromkeys(r.ids[p + st.length] for p in st.matches if p + st.length < len(r.ids)))
            if any(r.ends[p + st.length - 1] for p in st.matches):
                out += [s.end_id] if key_first else [s.key_id[k] for k in s.copy_keys if self._open(st, k)]
            return out or [s.eos_id]
        return []

    def advance(self, st: GrammarState, tok: int) -> GrammarState:
        """The state after emitting ``tok`` (an allowed id). Mutates and returns ``st``."""
        s, r = self.s, self.req
        if st.phase == "copy":
            if tok < s.base_vocab:
                st.matches = [p for p in st.matches if p + st.length < len(r.ids) and r.ids[p + st.length] == tok]
                st.length += 1
                return st
            if tok in s.id_key or (self.key_first and tok == s.end_id and st.key is not None):
                key = s.id_key[tok] if tok in s.id_key else st.key
                p = next(p for p in st.matches if r.ends[p + st.length - 1])
                st.items.append((key, r.span_text(p, p + st.length)))
                st.used.append(key)
                st.min_start = max(st.min_start, p + st.length)
                st.phase, st.key = "item", None
                return st
        if tok == s.eos_id:
            st.phase = "done"
        elif tok in s.id_enum:
            k, v = s.id_enum[tok]
            st.items.append((k, json.loads(v)))
            st.used.append(k)
            st.phase = "item"
        elif tok in s.id_key:  # key first: the span that follows is this key's
            st.key, st.phase = s.id_key[tok], "first"
        else:  # a span's first token
            lo = st.min_start if s.monotone else 0
            cand = [i for i in range(len(r.ids)) if r.starts[i] and r.ids[i] == tok]
            st.matches = [i for i in cand if i >= lo] or cand
            st.length = 1
            st.phase = "copy"
        return st

    def kind(self, st: GrammarState, tok: int) -> str:
        """What choosing ``tok`` in ``st`` decides: ``label``, ``key``, ``eos``, ``first`` (a span's first
        token), ``cont`` (a span goes on) or ``end`` (key first: a span ends)."""
        s = self.s
        if tok == s.eos_id:
            return "eos"
        if tok == s.end_id and self.key_first:
            return "end"
        if tok in s.id_enum:
            return "label"
        if tok in s.id_key:
            return "key"
        return "cont" if st.phase == "copy" else "first"

    def draft(self, st: GrammarState, max_len: int) -> list[int]:
        """A guess at how a span goes on: the request tokens after its first match (copy speculation)."""
        if st.phase != "copy" or not st.matches:
            return []
        p = st.matches[0] + st.length
        return self.req.ids[p:min(len(self.req.ids), p + max_len)]

    def to_obj(self, st: GrammarState) -> dict[str, Any]:
        """The JSON object of the items emitted so far (a repeated key becomes a list)."""
        obj: dict[str, Any] = {}
        for k, v in st.items:
            if k in obj:
                obj[k] = (obj[k] if isinstance(obj[k], list) else [obj[k]]) + [v]
            elif k in self.s.always_list:
                obj[k] = [v]
            else:
                obj[k] = v
        return obj

    def to_json(self, st: GrammarState) -> str:
        """The answer as the teacher writes it (its separators and ASCII escaping)."""
        fmt = self.s.json_format or {}
        seps = fmt.get("separators") or [", ", ": "]
        return json.dumps(self.to_obj(st), ensure_ascii=bool(fmt.get("ensure_ascii", False)),
                          separators=(seps[0], seps[1]), indent=fmt.get("indent"))
