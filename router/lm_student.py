"""LM students (kind ``"lm"``): a small causal LM that answers free text, with a calibrated confidence.

Three parts, shared by every place that serves or evaluates an LM student:

- confidence: :func:`logprob_features` (mean, minimum, low quantiles and length of the answer's token
  logprobs: the sum alone is length-biased) and :class:`Calibrator` (a logistic model over those
  features plus a PCA-reduced prompt embedding, stored as JSON, applied with numpy);
- :class:`LMEngine`: one loaded artifact (base model + LoRA adapter, or full weights) that generates a
  batch of chats and returns per-token OpenAI-format logprobs;
- :class:`EmbeddedLMStudent`: the in-process backend. ``predict`` may be called from many threads; a
  batching thread gathers concurrent calls into one ``generate`` batch. :meth:`EmbeddedLMStudent.swap`
  loads a new artifact and switches atomically; batches already running finish on the old engine.

Other backends (the gateway's vLLM client) register with :func:`register_backend`; this module
imports nothing from the gateway. torch and transformers are imported only when a model is loaded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import load_manifest
from router.student import Student, StudentError, StudentOutput, register_kind
from router.text import message_text

__all__ = [
    "FEATURE_NAMES",
    "logprob_features",
    "Calibrator",
    "prompt_text",
    "embed_prompts",
    "Generation",
    "LMEngine",
    "EmbeddedLMStudent",
    "register_backend",
    "load_lm_student",
    "apply_stop",
]

log = logging.getLogger(__name__)

FEATURE_NAMES = ["mean", "min", "q10", "q25", "last", "log_len"]


# --------------------------------------------------------------------------------------------
# confidence features and calibration
# --------------------------------------------------------------------------------------------
def logprob_features(logprobs: Sequence[float]) -> np.ndarray:
    """Length-robust statistics of an answer's token logprobs, in :data:`FEATURE_NAMES` order.

    The mean and low quantiles say how sure the model was on its hardest tokens; the length is a
    separate feature so a long, confident answer is not penalised as the summed logprob would be.
    """
    lp = np.asarray(list(logprobs), dtype=np.float64)
    if lp.size == 0:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    lp = np.maximum(lp, -50.0)  # -inf from a zero-probability sample would poison the calibrator
    return np.array(
        [
            float(lp.mean()),
            float(lp.min()),
            float(np.quantile(lp, 0.10)),
            float(np.quantile(lp, 0.25)),
            float(lp[-1]),
            math.log1p(lp.size),
        ]
    )


@dataclass
class Calibrator:
    """P(student answer agrees with the teacher | logprob features, prompt embedding).

    A logistic model over standardised features; the prompt embedding enters through a fixed PCA
    projection (``components`` rows). ``kind="constant"`` is the fallback when validation held only
    one outcome: every answer gets the smoothed validation agreement.
    """

    kind: str  # "logistic" | "constant"
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    embedding_model: str | None = None
    pca_mean: list[float] | None = None
    components: list[list[float]] | None = None
    constant: float | None = None

    @property
    def uses_embedding(self) -> bool:
        return self.kind == "logistic" and self.components is not None and self.embedding_model is not None

    def design(self, features: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        """Stack logprob features with the projected embedding (the calibrator's input matrix)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if self.components is not None:
            if embeddings is None:
                raise StudentError("This calibrator needs the prompt embedding, and none was given.")
            e = np.atleast_2d(np.asarray(embeddings, dtype=np.float64)) - np.asarray(self.pca_mean)
            x = np.hstack([x, e @ np.asarray(self.components).T])
        return x

    def predict(self, features: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities, one per row of ``features``."""
        n = np.atleast_2d(features).shape[0]
        if self.kind == "constant":
            return np.full(n, float(self.constant if self.constant is not None else 0.0))
        x = (self.design(features, embeddings) - np.asarray(self.mean)) / np.asarray(self.scale)
        z = x @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Calibrator":
        known = {"kind", "mean", "scale", "coef", "intercept", "embedding_model", "pca_mean", "components", "constant"}
        return cls(**{k: v for k, v in data.items() if k in known})


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """What varies in a request: its user turns (the system prompt is the route's constant)."""
    return "\n".join(message_text(m) for m in messages if m.get("role") == "user")


def embed_prompts(texts: Sequence[str], model: str) -> np.ndarray:
    """Normalised float32 embeddings of ``texts`` with the process-wide embedder for ``model``."""
    from router.embedding import get_embedder

    return np.asarray(get_embedder(model).encode(list(texts)), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """One generated answer: text, OpenAI-format logprob entries, the chosen tokens' logprobs."""

    text: str
    logprobs: list[dict[str, Any]]
    token_logprobs: list[float]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def apply_stop(gen: Generation, stop: str | list[str] | None, tokenizer: Any = None) -> Generation:
    """Cut a generation at the first stop string (OpenAI semantics: the stop text is not returned)."""
    if not stop:
        return gen
    stops = [stop] if isinstance(stop, str) else list(stop)
    cut = min((gen.text.find(s) for s in stops if s and s in gen.text), default=-1)
    if cut < 0:
        return gen
    text = gen.text[:cut]
    kept, length = 0, 0
    for entry in gen.logprobs:
        if length >= cut:
            break
        length += len(entry["token"])
        kept += 1
    return Generation(
        text=text,
        logprobs=gen.logprobs[:kept],
        token_logprobs=gen.token_logprobs[:kept],
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=kept,
        finish_reason="stop",
    )


def pick_device(requested: str | None = None) -> str:
    """``requested`` if given, else CUDA when present, else CPU."""
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class LMEngine:
    """A loaded LM: base model (+ LoRA adapter merged in, or full weights) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str, version: int = 0, manifest: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.version = version
        self.manifest = manifest or {}
        self.lock = threading.Lock()  # one generate() at a time per engine
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    @classmethod
    def from_parts(
        cls,
        *,
        base_model: str,
        adapter_dir: str | Path | None = None,
        model_dir: str | Path | None = None,
        tokenizer_dir: str | Path | None = None,
        device: str | None = None,
        dtype: str = "auto",
        version: int = 0,
        manifest: dict | None = None,
    ) -> "LMEngine":
        """Load full weights from ``model_dir``, or ``base_model`` with the LoRA adapter in ``adapter_dir``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(device)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        source = str(model_dir) if model_dir is not None else base_model
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            model = model.merge_and_unload()  # merged: generation costs the same as the base model
        model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir) if tokenizer_dir else source)
        return cls(model, tokenizer, device=device, version=version, manifest=manifest)

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], *, device: str | None = None) -> "LMEngine":
        """Load the model an ``lm`` artifact describes (its files already verified by load_manifest)."""
        weights = manifest.get("weights")
        parts = {"adapter": {"adapter_dir": directory / "adapter"}, "full": {"model_dir": directory / "model"}}
        if weights not in parts:
            raise StudentError(f"The lm artifact in {directory} has unknown weights {weights!r} (want 'adapter' or 'full').")
        return cls.from_parts(
            base_model=manifest["base_model"],
            tokenizer_dir=directory / "tokenizer",
            device=device,
            version=int(manifest.get("version", 0)),
            manifest=manifest,
            **parts[weights],
        )

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        chats: Sequence[Sequence[dict[str, Any]]],
        *,
        max_tokens: Sequence[int] | int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_logprobs: int = 0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Generate answers for ``chats`` in one batch; greedy when ``temperature`` is 0.

        Logprobs are those of the model's raw distribution (before temperature), as vLLM reports
        them by default; ``top_logprobs`` alternatives come from the same distribution.
        """
        import torch

        n = len(chats)
        if n == 0:
            return []
        limits = [int(max_tokens)] * n if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
        texts = [self.render(c) for c in chats]
        enc = self.tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        input_ids = enc["input_ids"].to(self.device)
        attention = enc["attention_mask"].to(self.device)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(1, max(limits)),
            do_sample=temperature > 0,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if temperature > 0:
            kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            # an explicit greedy config: base models may ship sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with self.lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = out.sequences[:, input_ids.shape[1] :]
        logps = torch.stack(out.logits, dim=1).float().log_softmax(dim=-1)  # [batch, steps, vocab]
        eos = set(self.eos_ids)
        results = []
        for i in range(n):
            ids: list[int] = []
            entries: list[dict[str, Any]] = []
            chosen: list[float] = []
            finish = "length"
            for step in range(min(limits[i], new_tokens.shape[1])):
                tid = int(new_tokens[i, step])
                if tid in eos:
                    finish = "stop"
                    break
                lp = float(logps[i, step, tid])
                entry = self._entry(tid, lp)
                if top_logprobs:
                    values, indices = logps[i, step].topk(int(top_logprobs))
                    entry["top_logprobs"] = [self._entry(int(t), float(v)) for v, t in zip(values, indices)]
                else:
                    entry["top_logprobs"] = []
                ids.append(tid)
                entries.append(entry)
                chosen.append(lp)
            results.append(
                Generation(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    logprobs=entries,
                    token_logprobs=chosen,
                    prompt_tokens=int(prompt_lens[i]),
                    completion_tokens=len(ids),
                    finish_reason=finish,
                )
            )
        return results

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


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


def confidence_for(
    calibrator: Calibrator | None,
    token_logprobs: Sequence[Sequence[float]],
    messages: Sequence[Sequence[dict[str, Any]]],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Calibrated confidences for a batch of answers, and the prompt embeddings if computed.

    Shared by the embedded and vLLM backends so both score an answer identically.
    """
    feats = np.vstack([logprob_features(lp) for lp in token_logprobs])
    embeddings = None
    if calibrator is not None and calibrator.uses_embedding:
        embeddings = embed_prompts([prompt_text(m) for m in messages], calibrator.embedding_model or "")
    if calibrator is None:
        # uncalibrated: the geometric-mean token probability is a usable, if optimistic, score
        return np.exp(feats[:, 0]), embeddings
    return calibrator.predict(feats, embeddings), embeddings


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
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._loaded = _Loaded(LMEngine.from_artifact(self.directory, manifest, device=device), manifest)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self.batches = 0  # how many generate() batches ran (observable batching)
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._run, name=f"kdgate-lm-{self.route}", daemon=True)
        self._thread.start()

    # the Student protocol's attributes follow the currently loaded artifact
    @property
    def route(self) -> str:
        return self._loaded.route

    @property
    def version(self) -> int:
        return self._loaded.version

    @property
    def manifest(self) -> dict[str, Any]:
        return self._loaded.manifest

    def warm(self) -> None:
        """Run one tiny generation (and load the prompt embedder) so the first request is not slow."""
        self.predict([{"role": "user", "content": "warm-up"}], {"max_tokens": 1})

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> StudentOutput:
        """Answer one chat; blocks until its batch has run. Raises StudentError on failure."""
        if self._closed:
            raise StudentError("This LM student is closed.")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Pending(list(messages), dict(params or {}), future))
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
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- batching thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            groups: dict[tuple, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(_sampling_key(p.params), []).append(p)
            for key, group in groups.items():
                self._serve(key, group)
            if stop:
                break
        # fail whatever is still queued rather than leave callers waiting forever
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.future.set_exception(StudentError("The LM student was closed."))

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
