"""A label student's sentence encoder run by ONNX Runtime on the serving path.

The router decides student-or-teacher on every request, one or a few at a time, and most of that
decision is the sentence encoder. PyTorch pays a fixed cost per call (dispatch, the autograd-free
module tree) that dominates short inputs. all-MiniLM-L6-v2 on one text, two threads, idle machine,
medians of 50: 16 tokens 10.6 ms in PyTorch against 5.6 ms here, 64 tokens 17.0 vs 12.2 ms, 128
tokens 23.6 vs 22.6 ms, 256 tokens 41.9 vs 49.6 ms. Past ``embedding.ONNX_MAX_TOKENS`` the batch goes
to PyTorch, which is faster there; the encoder's own cap (``max_seq_length``: 256 for MiniLM, 64 for
an encoder the distiller fine-tuned) bounds the work.

The graph is the transformer followed by the model's own mean pooling and normalisation, so its
vectors equal PyTorch's to float rounding (max abs difference ~1e-7 over the probes); the export is
checked against PyTorch before it is used and dropped (with a warning) if it differs by more than
``TOLERANCE``. Vectors are therefore interchangeable with the ones the distiller computed in
PyTorch: same embedding key, no retraining. Only models of exactly transformer -> mean pooling ->
normalize are exported (``Embedder._plain_mean_pooling``); others stay in PyTorch.

Exports are cached under ``$KDGATE_MODEL_CACHE/onnx-encoders`` (default
``~/.cache/kdgate/base-models/onnx-encoders``), named by a hash of the weights, so each encoder is
exported once (about 3 s for MiniLM) and a fine-tuned version's encoder gets its own file. Every
use stamps the file's access time, and the cache keeps the ``$KDGATE_ONNX_CACHE_KEEP`` (default
:data:`CACHE_KEEP`) most recently used exports: a route that fine-tunes every few thousand pairs
would otherwise leave ~90 MB behind per version, forever. A running process has its graph in
memory, so removing its file costs it nothing; another process that finds its export gone exports
it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

log = logging.getLogger(__name__)

__all__ = ["OnnxEncoder", "available", "cache_dir", "prune_cache", "TOLERANCE", "CACHE_KEEP"]

TOLERANCE = 1e-4  # largest |difference| from PyTorch's vector on the probes for the export to be used
OPSET = 17
CACHE_KEEP = 8  # exports kept (most recently used first); $KDGATE_ONNX_CACHE_KEEP overrides
_EXPORT_NAME = re.compile(r"[0-9a-f]{32}")  # what _weights_key names; a temporary file never matches
_PROBES = ["warm up", "Why was my card declined at the store yesterday when I had money on the account?"]


def available() -> bool:
    """Whether ONNX Runtime and the exporter's ``onnx`` package are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    from router.lm_base import model_cache

    return model_cache() / "onnx-encoders"


def _cache_keep() -> int:
    raw = os.environ.get("KDGATE_ONNX_CACHE_KEEP", "")
    try:
        return max(1, int(raw)) if raw.strip() else CACHE_KEEP
    except ValueError:
        log.warning("KDGATE_ONNX_CACHE_KEEP=%r is not a whole number; keeping %d exports", raw, CACHE_KEEP)
        return CACHE_KEEP


def _mark_used(path: Path) -> None:
    """Stamp ``path``'s access time (its modification time stays: it says when it was exported)."""
    try:
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    except OSError:
        pass


def prune_cache(directory: Path, keep: int, *, protect: Path | None = None) -> list[Path]:
    """Remove all but the ``keep`` most recently used exports in ``directory`` (never ``protect``,
    never a file that is not an export, such as another process's export being written). Returns
    what it removed."""
    found = []
    for path in directory.glob("*.onnx"):
        if not _EXPORT_NAME.fullmatch(path.stem):
            continue
        try:
            found.append((path.stat().st_atime_ns, path))
        except OSError:
            continue  # removed meanwhile
    found.sort(reverse=True)
    removed = []
    for _, path in found[keep:]:
        if protect is not None and path == protect:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _weights_key(module: Any) -> str:
    """A hash of the transformer's parameters and buffers (names, shapes, bytes) and the exporter."""
    import torch

    h = hashlib.sha256(f"torch={torch.__version__};opset={OPSET}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _pooled(transformer: Any) -> Any:
    """transformer -> masked mean -> L2 normalise, as one module to export."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=1)

    return Pooled(transformer).eval()


class OnnxEncoder:
    """One exported encoder and its ONNX Runtime session; ``encode`` is thread-safe."""

    def __init__(self, path: Path, tokenizer: Any, *, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's pool spins after each run by default: in the gateway that burns the cores the
        # event loop and the other students' sessions need (measured: a second session's decisions
        # took ~5 ms longer while the first one's threads spun)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.tokenizer = tokenizer
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    @classmethod
    def for_model(cls, st_model: Any, reference: Any) -> OnnxEncoder | None:
        """Export (or find the cached export of) a plain mean-pooling sentence-transformers model,
        check it against ``reference(texts) -> vectors`` (PyTorch) and return it; None when the
        export fails or differs."""
        import torch

        transformer = st_model[0].auto_model
        path = cache_dir() / f"{_weights_key(transformer)}.onnx"
        threads = torch.get_num_threads()
        try:
            try:
                enc = cls(path, st_model.tokenizer, threads=threads) if path.exists() else None
            except Exception as exc:  # noqa: BLE001 - a damaged cache file: export it again
                log.warning("cached ONNX encoder %s unreadable (%s); exporting it again", path.name, type(exc).__name__)
                enc = None
            if enc is None:
                cls._export(transformer, st_model.tokenizer, path)
                enc = cls(path, st_model.tokenizer, threads=threads)
            max_len = int(st_model.max_seq_length or 512)
            diff = float(np.abs(enc.encode(_PROBES, max_len) - np.asarray(reference(_PROBES))).max())
        except Exception as exc:  # noqa: BLE001 - any failure leaves the encoder on PyTorch
            log.warning("ONNX export of the student encoder failed (%s: %s); serving it with PyTorch",
                        type(exc).__name__, exc)
            return None
        if diff > TOLERANCE:
            log.warning("ONNX encoder differs from PyTorch by %.2g (> %.0e); serving it with PyTorch", diff, TOLERANCE)
            return None
        log.info("student encoder on ONNX Runtime (%s, max |diff| %.1e)", path.name, diff)
        _mark_used(path)
        removed = prune_cache(path.parent, _cache_keep(), protect=path)
        if removed:
            log.info("ONNX encoder cache: removed %d least recently used exports", len(removed))
        return enc

    @staticmethod
    def _export(transformer: Any, tokenizer: Any, path: Path) -> None:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        example = tokenizer(_PROBES, return_tensors="pt", padding=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                torch.onnx.export(
                    _pooled(transformer), (example["input_ids"], example["attention_mask"]), tmp,
                    input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                    dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                  "embedding": {0: "batch"}},
                    opset_version=OPSET, dynamo=False)
            os.replace(tmp, path)  # another process exporting the same weights writes the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def encode(self, texts: Sequence[str], max_tokens: int, *, longest: int | None = None) -> np.ndarray | None:
        """The texts' vectors, truncated at ``max_tokens``; None when the batch is longer than
        ``longest`` tokens (the caller's PyTorch path is faster there)."""
        tok = self.tokenizer(list(texts), return_tensors="np", padding=True, truncation=True, max_length=max_tokens)
        if longest is not None and tok["input_ids"].shape[1] > longest:
            return None
        feed = {"input_ids": tok["input_ids"].astype(np.int64), "attention_mask": tok["attention_mask"].astype(np.int64)}
        (vecs,) = self.session.run(None, feed)
        return np.ascontiguousarray(vecs, dtype=np.float32)

