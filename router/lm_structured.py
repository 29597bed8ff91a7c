"""Structured LM students (kind ``"lm_structured"``): extraction routes answered by a small pretrained LM
under the route's answer grammar, with a calibrated confidence.

The artifact (written by :mod:`distiller.lm.structured`)::

    manifest.json       kind, route, version, base_model (a packaged name, hub id or path) and its
                        sha256, weights ("adapter" or "full"), template, calibration, metrics, decoding
    schema.json         the route's answer grammar (:class:`router.lm_grammar.RouteSchema`)
    adapter/            the LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors)
    model/              instead of adapter/ for a fully fine-tuned (tiny) base
    extra.safetensors   the extra-token embeddings (keys, enum values, end): "in" and, for an untied
                        base, "out"
    tokenizer/          the base's tokenizer

Loading merges the LoRA deltas into a float32 copy of the base (so the small deltas are not lost to
bf16 rounding) and builds the fastest decoder for it (:func:`router.lm_decode.build_engine`).
:class:`StructuredLMStudent` serves it in-process: concurrent calls are gathered by a thread into
one lockstep batch (:func:`router.lm_decode.decode_batch`). An answer is valid JSON of the route's
shape by construction; a decode that runs out of steps raises :class:`StudentError`, so the gateway
escalates it instead of serving it.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.batching import MicroBatcher
from router.lm_base import check_base, resolve_base
from router.lm_confidence import Calibrator, answer_features
from router.lm_grammar import Request, RouteSchema
from router.student import Student, StudentError, StudentOutput, register_kind
from router.template import Template

__all__ = ["KIND", "StructuredModel", "StructuredLMStudent", "load_structured_model", "load_structured_student",
           "confidence_of", "register_backend"]

log = logging.getLogger(__name__)

KIND = "lm_structured"


def readable(req: Request, max_input_tokens: int) -> bool:
    """Whether a student that reads at most ``max_input_tokens`` reads ``req`` (longer ones escalate)."""
    return len(req.ids) <= max_input_tokens


@dataclass
class StructuredModel:
    """A loaded structured student: decoder, grammar, tokenizer, template and calibrator."""

    engine: Any
    schema: RouteSchema
    tokenizer: Any
    template: Template
    calibrator: Calibrator | None
    max_draft: int = 4
    max_input_tokens: int = 512

    def request(self, text: str) -> Request:
        req = Request.make(self.tokenizer, text)
        if not readable(req, self.max_input_tokens):
            raise StudentError(f"The request is {len(req.ids)} tokens long; this student reads at most "
                               f"{self.max_input_tokens}.")
        return req

    def decode(self, texts: Sequence[str]) -> list[Any]:
        """Greedy constrained answers (:class:`router.lm_decode.Result`) to already stripped texts."""
        from router.lm_decode import decode_batch

        return decode_batch(self.engine, self.schema, [self.request(t) for t in texts], max_draft=self.max_draft)

    def confidence(self, results: Sequence[Any]) -> np.ndarray:
        """Calibrated probabilities that each answer agrees with the teacher's."""
        return confidence_of(self.calibrator, results)


def confidence_of(calibrator: Calibrator | None, results: Sequence[Any]) -> np.ndarray:
    """Calibrated probabilities that each decoded answer (its ``decisions``) agrees with the teacher's;
    the same for every backend that decodes under the grammar (in-process, vLLM)."""
    if not results:
        return np.zeros(0)
    feats = np.vstack([answer_features(r) for r in results])
    if calibrator is None:
        return np.exp(feats[:, 0])  # uncalibrated: the weakest decision
    return calibrator.predict(feats)


def _device(requested: str | None) -> str:
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_structured_model(directory: str | Path, manifest: dict[str, Any], *, device: str | None = None,
                          weights: str | None = None, decoder: str = "lean") -> StructuredModel:
    """Load what ``directory`` holds as ``manifest`` describes it (the manifest need not be written
    yet: the distiller evaluates the files it is about to register)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    device = _device(device)
    decoding = manifest.get("decoding") or {}
    kind = manifest.get("weights")
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(directory / "model"), dtype=torch.float32)
    elif kind == "adapter":
        base = resolve_base(manifest["base_model"])
        check_base(base, manifest.get("base_sha256"))
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(directory / "adapter")).merge_and_unload()
    else:
        raise StudentError(f"The {KIND} artifact in {directory} has unknown weights {kind!r} (want 'adapter' or 'full').")
    model.eval()
    extra = load_file(str(directory / "extra.safetensors"))
    extra_in = extra["in"]
    extra_out = extra.get("out", extra_in)  # tied bases: the same rows read the input and score the output
    from router.lm_decode import build_engine

    if device != "cpu":
        model = model.to(device, torch.bfloat16)
    engine = build_engine(model, extra_in, extra_out, device=device, weights=weights or decoding.get("weights", "bf16"),
                          decoder=decoder)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    schema = RouteSchema.from_dict(json.loads((directory / "schema.json").read_text()))
    calibration = manifest.get("calibration")
    return StructuredModel(
        engine=engine, schema=schema, tokenizer=tokenizer, template=Template.from_dict(manifest.get("template")),
        calibrator=Calibrator.from_json(calibration) if calibration else None,
        max_draft=int(decoding.get("max_draft", 4)), max_input_tokens=int(decoding.get("max_input_tokens", 512)))


@dataclass
class _Pending:
    messages: list[dict[str, Any]]
    future: concurrent.futures.Future


class StructuredLMStudent:
    """In-process structured student: concurrent ``predict`` calls decoded together, answers as JSON
    text in the teacher's formatting, a calibrated confidence each."""

    kind = KIND
    answer_format = "json"

    def __init__(self, directory: Path, manifest: dict[str, Any], *, device: str | None = None, max_batch: int = 8,
                 max_wait_ms: float = 2.0):
        self.directory = Path(directory)
        self.manifest = manifest
        self.route = str(manifest.get("route", ""))
        self.version = int(manifest.get("version", 0))
        self.model = load_structured_model(self.directory, manifest, device=device)
        self.batches = 0
        self._batcher: MicroBatcher[_Pending] = MicroBatcher(
            self._serve, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0, name=f"kdgate-lm-structured-{self.route}",
            closed_error=lambda: StudentError("The structured LM student was closed."))

    def warm(self) -> None:
        """One decode, so the first request does not pay for lazy initialisation."""
        try:
            self.predict([{"role": "user", "content": "warm up"}], {})
        except StudentError:
            pass

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any] | None = None) -> StudentOutput:
        """Answer one chat (blocks until its batch has run); raises StudentError when it cannot."""
        if self._batcher.closed:
            raise StudentError("This structured LM student is closed.")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._batcher.put(_Pending(list(messages), future))
        return future.result()

    async def apredict(self, messages: list[dict[str, Any]], params: dict[str, Any] | None = None) -> StudentOutput:
        """``predict`` without blocking the event loop."""
        import asyncio

        return await asyncio.to_thread(self.predict, messages, params)

    def close(self) -> None:
        self._batcher.close()

    def _serve(self, batch: list[_Pending]) -> None:
        model = self.model
        texts, ready = [], []
        for p in batch:
            try:
                texts.append(model.template.strip(p.messages))
                model.request(texts[-1])  # too long: this request escalates, the others go on
                ready.append(p)
            except StudentError as exc:
                texts.pop()
                p.future.set_exception(exc)
            except Exception as exc:  # noqa: BLE001
                texts.pop()
                p.future.set_exception(StudentError(f"The structured LM student cannot read this request: {exc}"))
        if not ready:
            return
        try:
            results = model.decode(texts)
            confidence = model.confidence(results)
        except Exception as exc:  # noqa: BLE001 - any failure escalates to the teacher
            log.exception("structured lm student %s failed on a batch of %d", self.route, len(ready))
            for p in ready:
                p.future.set_exception(StudentError(f"The structured LM student failed: {exc}"))
            return
        self.batches += 1
        for p, res, conf in zip(ready, results, confidence):
            if not res.complete:
                p.future.set_exception(StudentError(
                    f"The structured LM student did not finish its answer within {len(res.decisions)} decisions; "
                    "an unfinished answer is never served."))
                continue
            p.future.set_result(StudentOutput(
                text=res.text, confidence=float(conf), version=self.version, prompt_tokens=res.prompt_tokens,
                completion_tokens=res.completion_tokens,
                extra={"backend": "embedded", "decisions": len(res.decisions), "views_agree": res.views_agree,
                       "passes": res.passes,
                       "batch_size": len(ready), "decode_ms": round(res.ms, 2)}))


_BACKENDS: dict[str, Any] = {}


def register_backend(name: str, factory: Any) -> None:
    """Register ``factory(directory, manifest, **options) -> Student`` as a serving backend of
    structured students (the gateway registers ``vllm``: :mod:`gateway.vllm_structured`)."""
    _BACKENDS[name] = factory


def load_structured_student(directory: Path, manifest: dict[str, Any], **options: Any) -> Student:
    """The ``lm_structured`` loader: in-process (``device``, ``max_batch``, ``max_wait_ms`` apply), or the
    registered backend named by ``backend``."""
    backend = options.get("backend") or "embedded"
    if backend != "embedded":
        if backend not in _BACKENDS:
            raise StudentError(f"No structured-student backend {backend!r} is registered (known: embedded, "
                               f"{', '.join(sorted(_BACKENDS)) or 'none else'}).")
        return _BACKENDS[backend](Path(directory), manifest, **options)
    return StructuredLMStudent(Path(directory), manifest, device=options.get("device"),
                               max_batch=int(options.get("max_batch", 8)),
                               max_wait_ms=float(options.get("max_wait_ms", 2.0)))


register_kind(KIND, load_structured_student)
