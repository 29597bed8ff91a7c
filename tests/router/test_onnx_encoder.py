"""The serving path's student encoder on ONNX Runtime: the same vectors as PyTorch, exported once,
and PyTorch whenever the export cannot be trusted."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from router import embedding, onnx_encoder
from router.embedding import DEFAULT_MODEL, Embedder

TEXTS = [
    "hi",
    "my card was declined",
    "I was charged twice for the same coffee this morning and the second payment still shows as pending, why?",
    "please transfer " + "a lot of money " * 60,  # past the encoder's 256-token cap: truncated alike
]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDGATE_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models" / "onnx-encoders"


def _torch_vectors(texts):
    ref = Embedder(DEFAULT_MODEL)
    return np.stack([ref.encode([t])[0] for t in texts]), ref.encode(texts)


def test_onnx_vectors_equal_pytorch_one_at_a_time_and_in_batches(cache, monkeypatch):
    singles, batch = _torch_vectors(TEXTS)
    monkeypatch.setattr(embedding, "_runtime", "onnx")
    monkeypatch.setattr(embedding, "ONNX_MAX_TOKENS", 10_000)  # every text through ONNX Runtime here
    emb = Embedder(DEFAULT_MODEL)
    assert emb.runtime == "onnx"
    ours_single = np.stack([emb.encode([t])[0] for t in TEXTS])
    ours_batch = emb.encode(TEXTS)
    assert np.abs(ours_single - singles).max() < 1e-5
    assert np.abs(ours_batch - batch).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours_batch, axis=1), 1.0, atol=1e-5)
    assert ours_batch.dtype == np.float32 and ours_batch.flags["C_CONTIGUOUS"]
    assert len(list(cache.glob("*.onnx"))) == 1


def test_long_inputs_go_to_pytorch(cache, monkeypatch):
    monkeypatch.setattr(embedding, "_runtime", "onnx")
    emb = Embedder(DEFAULT_MODEL)
    short = emb.encode([TEXTS[1]])
    assert emb.runtime == "onnx"

    def refuse(*_a, **_k):
        raise AssertionError("ONNX Runtime ran a batch longer than ONNX_MAX_TOKENS")

    real = emb._onnx.session
    emb._onnx.session = type("Refuse", (), {"run": staticmethod(refuse)})()
    try:
        long_vec = emb.encode([TEXTS[3]])  # 256 tokens after truncation > ONNX_MAX_TOKENS
        with pytest.raises(AssertionError, match="longer than"):
            emb.encode([TEXTS[1]])  # a short one still goes to the session
    finally:
        emb._onnx.session = real
    assert np.abs(long_vec - _torch_vectors([TEXTS[3]])[0]).max() < 1e-6
    assert np.abs(short - _torch_vectors([TEXTS[1]])[0]).max() < 1e-5


def test_the_export_is_made_once_and_reused(cache, monkeypatch):
    monkeypatch.setattr(embedding, "_runtime", "onnx")
    Embedder(DEFAULT_MODEL).encode(["first"])
    (path,) = cache.glob("*.onnx")
    stamp = path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(onnx_encoder.OnnxEncoder, "_export", staticmethod(lambda *a: calls.append(a)))
    Embedder(DEFAULT_MODEL).encode(["second"])
    assert calls == [] and path.stat().st_mtime_ns == stamp


def test_an_export_that_differs_from_pytorch_is_not_used(cache, monkeypatch, caplog):
    monkeypatch.setattr(embedding, "_runtime", "onnx")
    monkeypatch.setattr(onnx_encoder, "TOLERANCE", -1.0)  # no export can pass: the check must refuse it
    emb = Embedder(DEFAULT_MODEL)
    with caplog.at_level("WARNING"):
        vec = emb.encode(["my card was declined"])
    assert emb.runtime == "torch"
    assert "serving it with PyTorch" in caplog.text
    assert np.abs(vec - _torch_vectors(["my card was declined"])[0]).max() < 1e-6


def test_a_damaged_cached_export_is_made_again(cache, monkeypatch, caplog):
    monkeypatch.setattr(embedding, "_runtime", "onnx")
    Embedder(DEFAULT_MODEL).encode(["first"])
    (path,) = cache.glob("*.onnx")
    path.write_bytes(b"not an onnx graph")
    emb = Embedder(DEFAULT_MODEL)
    with caplog.at_level("WARNING"):
        vec = emb.encode(["my card was declined"])
    assert "exporting it again" in caplog.text
    assert emb.runtime == "onnx" and path.stat().st_size > 1_000_000
    assert np.abs(vec - _torch_vectors(["my card was declined"])[0]).max() < 1e-5


def test_a_failing_export_leaves_the_encoder_on_pytorch(cache, monkeypatch, caplog):
    monkeypatch.setattr(embedding, "_runtime", "onnx")

    def fail(*_):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(onnx_encoder.OnnxEncoder, "_export", staticmethod(fail))
    emb = Embedder(DEFAULT_MODEL)
    with caplog.at_level("WARNING"):
        vec = emb.encode(["second"])
    assert emb.runtime == "torch" and "export of the student encoder failed" in caplog.text
    assert vec.shape == (1, 384)


def test_the_serving_runtime_is_chosen_at_startup(monkeypatch):
    monkeypatch.setattr(embedding, "_runtime", "torch")
    import torch

    mkldnn = torch.backends.mkldnn.enabled
    try:
        assert embedding.prepare_serving_process("auto") == ("onnx" if onnx_encoder.available() else "torch")
        assert embedding.prepare_serving_process("torch") == "torch" and embedding._runtime == "torch"
        with pytest.raises(ValueError, match="encoder runtime"):
            embedding.prepare_serving_process("tensorrt")
    finally:
        torch.backends.mkldnn.enabled = mkldnn


def _fake_export(directory, name, used_ns):
    path = directory / f"{name}.onnx"
    path.write_bytes(b"graph")
    os.utime(path, ns=(used_ns, used_ns))
    return path


def test_the_cache_keeps_the_most_recently_used_exports(cache, monkeypatch):
    monkeypatch.setattr(embedding, "_runtime", "onnx")
    monkeypatch.setenv("KDGATE_ONNX_CACHE_KEEP", "3")
    cache.mkdir(parents=True)
    now = time.time_ns()
    # older versions' encoders, least recently used first, and another process's export being written
    old = [_fake_export(cache, f"{i:032x}", now - (10 - i) * 10**12) for i in range(5)]
    writing = cache / "tmpab12cd.onnx"
    writing.write_bytes(b"half a graph")
    os.utime(writing, ns=(now - 10**15, now - 10**15))
    Embedder(DEFAULT_MODEL).encode(["first"])  # exports MiniLM (the newest use), then prunes
    left = {p.name for p in cache.glob("*.onnx")}
    (mini,) = [p for p in cache.glob("*.onnx") if p not in old and p != writing]
    assert left == {mini.name, old[4].name, old[3].name, writing.name}
    # using an export again makes it the newest: the next prune keeps it over a newer-made one
    os.utime(old[3], ns=(now + 10**12, old[3].stat().st_mtime_ns))
    newer = _fake_export(cache, "f" * 32, now + 5 * 10**11)
    Embedder(DEFAULT_MODEL).encode(["second"])  # the cached MiniLM export: stamped, then pruned
    assert {p.name for p in cache.glob("*.onnx")} == {mini.name, old[3].name, newer.name, writing.name}


def test_prune_never_removes_the_export_in_use():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        now = time.time_ns()
        paths = [_fake_export(d, f"{i:032x}", now + i) for i in range(4)]
        removed = onnx_encoder.prune_cache(d, 1, protect=paths[0])  # the oldest is the one in use
        assert set(removed) == {paths[1], paths[2]}
        assert {p.name for p in d.iterdir()} == {paths[0].name, paths[3].name}
