"""LM students (kind ``"lm"``): a small causal LM that answers free text, with a calibrated confidence.

Three parts, each its own module, shared by every place that serves or evaluates an LM student:

- confidence (:mod:`router.lm_confidence`): the features of an answer's token logprobs and the
  calibrator over them;
- the engine (:mod:`router.lm_engine`): one loaded artifact that generates a batch of chats;
- :class:`EmbeddedLMStudent` (here): the in-process backend. ``predict`` may be called from many threads; a
  batching thread gathers concurrent calls into one ``generate`` batch. :meth:`EmbeddedLMStudent.swap`
  loads a new artifact and switches atomically; batches already running finish on the old engine.

Other backends (the gateway's vLLM client) register with :func:`register_backend`; this module
imports nothing from the gateway. torch and transformers are imported only when a model is loaded.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from router.artifact import load_manifest
from router.batching import MicroBatcher
from router.lm_confidence import (
    FEATURE_NAMES,
    Calibrator,
    confidence_for,
    embed_prompts,
    logprob_features,
    prompt_text,
)
from router.lm_engine import Generation, LMEngine, apply_stop, pick_device
from router.student import Student, StudentError, StudentOutput, register_kind

# The pieces of an LM student are one import away for every caller (distiller, gateway, tests).
__all__ = [
    "FEATURE_NAMES",
    "logprob_features",
    "Calibrator",
    "prompt_text",
    "embed_prompts",
    "confidence_for",
    "Generation",
    "LMEngine",
    "pick_device",
    "EmbeddedLMStudent",
    "register_backend",
    "load_lm_student",
    "apply_stop",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# the embedded backend
# --------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    future: concurrent.futures.Future


def _sampling_key(params: dict[str, Any]) -> tuple:
    # requests are batched together only when they sample the same way
    temperature = float(params.get("temperature") or 0.0)
    top_p = float(params.get("top_p") if params.get("top_p") is not None else 1.0)
    top = int(params.get("top_logprobs") or 0) if params.get("logprobs") or params.get("top_logprobs") else 0
    return (temperature, top_p, top, params.get("seed"))


def _max_tokens(params: dict[str, Any], default: int) -> int:
    value = params.get("max_completion_tokens") or params.get("max_tokens")
    return int(value) if value else default


class _Loaded:
    """An engine plus the artifact facts that go with it (swapped as one reference)."""

    def __init__(self, engine: LMEngine, manifest: dict[str, Any]):
        self.engine = engine
        self.manifest = manifest
        self.version = int(manifest.get("version", 0))
        self.route = str(manifest.get("route", ""))
        self.calibrator = Calibrator.from_json(manifest["calibration"]) if manifest.get("calibration") else None
        self.max_tokens = int(manifest.get("generation", {}).get("max_tokens", 256))


class EmbeddedLMStudent:
    """In-process LM student: batched generation, calibrated confidence, atomic hot swap."""

    kind = "lm"

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        *,
        device: str | None = None,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
    ):
        self.directory = Path(directory)
        self.device = device
        self._loaded = _Loaded(LMEngine.from_artifact(self.directory, manifest, device=device), manifest)
        self.batches = 0  # how many generate() batches ran (observable batching)
        self.batched_requests = 0
        self._batcher: MicroBatcher[_Pending] = MicroBatcher(
            self._serve_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0, name=f"kdgate-lm-{self.route}",
            closed_error=lambda: StudentError("The LM student was closed."))

    # the Student protocol's attributes follow the currently loaded artifact
    @property
    def route(self) -> str:
        return self._loaded.route

    @property
    def version(self) -> int:
        return self._loaded.version

    @property
    def answer_format(self) -> str:
        """``json`` when the route's answers are JSON (agreement compares them parsed), else ``text``."""
        return str(self._loaded.manifest.get("answer_format", "text"))

    @property
    def manifest(self) -> dict[str, Any]:
        return self._loaded.manifest

    def warm(self) -> None:
        """Run one tiny generation (and load the prompt embedder) so the first request is not slow."""
        self.predict([{"role": "user", "content": "warm-up"}], {"max_tokens": 1})

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> StudentOutput:
        """Answer one chat; blocks until its batch has run. Raises StudentError on failure."""
        if self._batcher.closed:
            raise StudentError("This LM student is closed.")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._batcher.put(_Pending(list(messages), dict(params or {}), future))
        return future.result()

    async def apredict(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> StudentOutput:
        """``predict`` without blocking the event loop."""
        import asyncio

        return await asyncio.to_thread(self.predict, messages, params)

    def swap(self, directory: str | Path, *, expected_checksum: str | None = None) -> None:
        """Load the artifact in ``directory`` and switch to it; no request is dropped.

        The new model is loaded before the switch (the old one keeps serving meanwhile); a batch
        already running holds its own reference and finishes on the old engine.
        """
        manifest = load_manifest(directory, expected_checksum=expected_checksum)
        if manifest.get("kind") != "lm":
            raise StudentError(f"Cannot swap in a {manifest.get('kind')!r} artifact: this student is an lm.")
        loaded = _Loaded(LMEngine.from_artifact(Path(directory), manifest, device=self.device), manifest)
        old = self._loaded
        self._loaded = loaded  # one reference assignment: atomic under the GIL
        self.directory = Path(directory)
        log.info("lm student %s swapped: version %d -> %d", loaded.route, old.version, loaded.version)

    def close(self) -> None:
        self._batcher.close()

    # -- batching thread ---------------------------------------------------------------------
    def _serve_batch(self, batch: list[_Pending]) -> None:
        groups: dict[tuple, list[_Pending]] = {}
        for p in batch:
            groups.setdefault(_sampling_key(p.params), []).append(p)
        for key, group in groups.items():
            self._serve(key, group)

    def _serve(self, key: tuple, group: list[_Pending]) -> None:
        loaded = self._loaded  # this batch's engine, even if a swap happens meanwhile
        temperature, top_p, top, seed = key
        try:
            gens = loaded.engine.generate(
                [p.messages for p in group],
                max_tokens=[_max_tokens(p.params, loaded.max_tokens) for p in group],
                temperature=temperature,
                top_p=top_p,
                top_logprobs=top,
                seed=seed,
            )
            gens = [apply_stop(g, p.params.get("stop")) for g, p in zip(gens, group)]
            conf, embeddings = confidence_for(loaded.calibrator, [g.token_logprobs for g in gens], [p.messages for p in group])
            self.batches += 1
            self.batched_requests += len(group)
            for i, (p, g) in enumerate(zip(group, gens)):
                if self.answer_format == "json" and not _parses(g.text):
                    # a JSON route's answer that does not parse is an escalation, never an answer
                    p.future.set_exception(StudentError("The LM student's answer is not valid JSON."))
                    continue
                p.future.set_result(
                    StudentOutput(
                        text=g.text,
                        confidence=float(conf[i]),
                        version=loaded.version,
                        prompt_tokens=g.prompt_tokens,
                        completion_tokens=g.completion_tokens,
                        logprobs=g.logprobs,
                        embedding=embeddings[i].tobytes() if embeddings is not None else None,
                        embedding_model=loaded.calibrator.embedding_model if embeddings is not None else None,
                        extra={"finish_reason": g.finish_reason, "backend": "embedded", "batch_size": len(group)},
                    )
                )
        except Exception as exc:  # noqa: BLE001 - any failure escalates to the teacher
            log.exception("lm student %s failed on a batch of %d", loaded.route, len(group))
            for p in group:
                if not p.future.done():
                    p.future.set_exception(StudentError(f"The LM student failed to generate: {exc}"))


def _parses(text: str) -> bool:
    import json

    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# loader registration
# --------------------------------------------------------------------------------------------
_BACKENDS: dict[str, Callable[..., Student]] = {}


def register_backend(name: str, factory: Callable[..., Student]) -> None:
    """Register ``factory(directory, manifest, **options) -> Student`` as an LM serving backend."""
    _BACKENDS[name] = factory


def _embedded(directory: Path, manifest: dict[str, Any], **options: Any) -> Student:
    return EmbeddedLMStudent(
        directory,
        manifest,
        device=options.get("device"),
        max_batch=int(options.get("max_batch", 16)),
        max_wait_ms=float(options.get("max_wait_ms", 5.0)),
    )


register_backend("embedded", _embedded)


def load_lm_student(directory: Path, manifest: dict[str, Any], *, backend: str = "embedded", **options: Any) -> Student:
    """The ``lm`` loader: ``backend="embedded"`` (in-process) or a registered one such as ``"vllm"``."""
    factory = _BACKENDS.get(backend)
    if factory is None:
        hint = " (import gateway.vllm_backend to register it)" if backend == "vllm" else ""
        raise StudentError(f"No LM serving backend named {backend!r}{hint}; known: {sorted(_BACKENDS)}.")
    return factory(Path(directory), manifest, **options)


register_kind("lm", load_lm_student)
