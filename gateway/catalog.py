"""The teacher models a client may ask for: the operator's choice, never the client's.

A request's ``model`` is a route name or alias (see :mod:`gateway.routing`), or it names a teacher.
It may name only

- the gateway's default ``teacher``, a route's ``teacher`` or ``fallback_teachers``, or one of
  ``teachers`` (each by its full litellm string, ``openai/gpt-4o-mini``, or by its bare model name,
  ``gpt-4o-mini``);
- a model matched by one of ``model_patterns`` (shell-style globs over full litellm strings, such as
  ``openai/gpt-4o*``; a bare name is tried with the default teacher's provider in front).

Anything else is unknown: 404 ``model_not_found`` in the surface's own error format, and no route is
created for it. ``teacher_for_unknown_models = "default"`` restores the old behaviour (the default
teacher answers whatever model was asked for); it is off by default because a misspelt model then
gets a 200 priced as a model it did not ask for, and any string becomes a permanent route.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from gateway.errors import ModelNotFound

__all__ = ["TeacherCatalog"]


def _bare(model: str) -> str:
    return model.split("/", 1)[1] if "/" in model else model


class TeacherCatalog:
    """Maps a requested model name to the litellm model string of a configured teacher."""

    def __init__(
        self,
        *,
        default: str,
        teachers: Iterable[str] = (),
        patterns: Iterable[str] = (),
        unknown: str = "reject",
    ):
        if unknown not in ("reject", "default"):
            raise ValueError(f"teacher_for_unknown_models must be 'reject' or 'default', not {unknown!r}")
        self.default = default
        self.default_provider = default.split("/", 1)[0] if "/" in default else "openai"
        self.patterns = tuple(patterns)
        self.unknown = unknown
        self._exact: dict[str, str] = {}
        for model in (default, *teachers):
            self.add(model)

    def add(self, model: str) -> None:
        """Let clients name ``model`` (a configured teacher) by its full or bare name."""
        self._exact.setdefault(model, model)
        self._exact.setdefault(_bare(model), model)

    @property
    def teachers(self) -> list[str]:
        """The configured teachers' litellm strings, default first."""
        seen = dict.fromkeys([self.default, *self._exact.values()])
        return list(seen)

    def lookup(self, requested: str | None) -> str | None:
        """The teacher ``requested`` names, or None when it names none (whatever the unknown policy)."""
        if not requested:
            return self.default
        found = self._exact.get(requested)
        if found is not None:
            return found
        candidates = [requested] if "/" in requested else [f"{self.default_provider}/{requested}", requested]
        for candidate in candidates:
            if any(fnmatch.fnmatchcase(candidate, p) for p in self.patterns):
                return candidate if "/" in candidate else f"{self.default_provider}/{candidate}"
        return None

    def resolve(self, requested: str | None, *, param: str = "model") -> str:
        """The teacher for ``requested``; raises :class:`ModelNotFound` for an unknown model unless
        the operator chose ``teacher_for_unknown_models = "default"``."""
        found = self.lookup(requested)
        if found is not None:
            return found
        if self.unknown == "default":
            return self.default
        raise ModelNotFound(
            f"The model `{_printable(requested or '')}` does not exist or you do not have access to it. "
            "This gateway serves its configured teachers and routes (GET /v1/models lists them); an operator "
            "can add more with `teachers` or `model_patterns`.",
            param=param,
        )

    def known(self, requested: str) -> bool:
        return self.lookup(requested) is not None


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text[:200])
