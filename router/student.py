"""What every student looks like to the gateway, whatever its kind.

A student is loaded from an artifact directory (see :mod:`router.artifact`) and answers a chat
request with its text and a calibrated confidence: the probability that its answer equals the
teacher's. Kinds register a loader here by name, so the gateway needs no import of the distiller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from router.artifact import load_manifest

__all__ = ["StudentOutput", "Student", "register_kind", "load_student", "StudentError", "answer_all"]


class StudentError(Exception):
    """A student could not be loaded or could not answer; the gateway escalates to the teacher."""


@dataclass
class StudentOutput:
    text: str  # the answer, formatted exactly as the teacher formats it
    confidence: float  # calibrated probability of agreeing with the teacher, in [0, 1]
    version: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # OpenAI chat ``logprobs.content`` entries ({"token", "logprob", "bytes", "top_logprobs"}), if any
    logprobs: list[dict[str, Any]] | None = None
    # the embedding of what varies in the prompt, so the ledger stores it once (float32 bytes)
    embedding: bytes | None = None
    embedding_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Student(Protocol):
    kind: str
    route: str
    version: int
    manifest: dict[str, Any]

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> StudentOutput:
        """Answer one request (blocking; the gateway calls it off the event loop)."""
        ...

    def close(self) -> None: ...


_LOADERS: dict[str, Callable[..., Student]] = {}


def register_kind(kind: str, loader: Callable[..., Student]) -> None:
    """Register ``loader(directory, manifest, **options) -> Student`` for artifacts of ``kind``."""
    _LOADERS[kind] = loader


def load_student(directory: str | Path, *, expected_checksum: str | None = None, **options: Any) -> Student:
    """Verify an artifact and load the student it holds."""
    manifest = load_manifest(directory, expected_checksum=expected_checksum)
    kind = manifest.get("kind")
    if kind not in _LOADERS:
        _import_builtin_kinds()
    loader = _LOADERS.get(kind)
    if loader is None:
        raise StudentError(f"No loader for student kind {kind!r} (known: {sorted(_LOADERS)}).")
    return loader(Path(directory), manifest, **options)


def _import_builtin_kinds() -> None:
    # Imported lazily: each pulls heavy libraries (numpy, torch, transformers).
    import importlib

    for module in ("router.label_student", "router.lm_student", "router.lm_structured"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def answer_all(student: Student, requests: list[list[dict[str, Any]]], *, workers: int = 8) -> list[StudentOutput | None]:
    """A student's answers to many requests, None where it declines one (it would escalate): in one
    ``predict_batch`` call where the student has one (label students), else ``workers`` requests at a
    time, so a student that batches concurrent calls itself (the LM students' micro-batcher) decodes
    them together. For offline scoring (the distiller's gate, the benches), not the serving path."""
    from concurrent.futures import ThreadPoolExecutor

    batch = getattr(student, "predict_batch", None)
    if batch is not None:
        return batch(requests)

    def one(messages: list[dict[str, Any]]) -> StudentOutput | None:
        try:
            return student.predict(messages, {})
        except StudentError:
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, requests))
