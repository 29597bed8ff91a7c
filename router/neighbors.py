"""A nearest-neighbour view of a label student: how the route's most similar logged requests were answered.

The linear heads draw one boundary per class through the whole embedding space; a request that sits
among 20 training requests the teacher all answered the same way is safer than its margin says, and
one whose neighbours disagree is riskier. The view is a class distribution per head, the
similarity-weighted votes of the ``k`` nearest training pairs (cosine similarity of the unit
embeddings, weights ``exp(similarity / temperature)``), smoothed towards uniform so one vote is never
certainty. :class:`router.label_student.LabelModel` blends it with the other views as a weighted
geometric mean.

Measured offline on banking77 (held-back rest of the stream, coverage at 98% agreement, blend weights
0.5 embedding head / 0.3 TF-IDF head / 0.2 neighbours): 2k pairs on the frozen encoder 71.2% -> 73.7%,
10k pairs on a fine-tuned encoder 89.9% -> 91.1%; sst2 at 5k pairs (frozen) 32.4% -> 35.4%.

Stored in ``heads.safetensors``: ``knn.X`` (pairs x dim, float16: a 10k-pair route is 7.7 MB for
MiniLM) and ``knn.y{i}`` (each pair's class per head, int32); parameters in ``student.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["NeighborVotes"]

_DEFAULTS: dict[str, Any] = {"k": 20, "temperature": 0.05, "smoothing": 0.1}
_SINGLE_THREAD_ROWS = 8


class NeighborVotes:
    """The memory (embeddings of training pairs and their class per head) and the vote parameters."""

    def __init__(self, X: np.ndarray, labels: Sequence[np.ndarray], params: dict[str, Any] | None = None):
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or any(len(y) != X.shape[0] for y in labels):
            raise ValueError(f"neighbour memory: {X.shape} embeddings but label rows {[len(y) for y in labels]}")
        self.X = np.ascontiguousarray(X)
        self.labels = [np.asarray(y, dtype=np.int64) for y in labels]
        self.params = {**_DEFAULTS, **(params or {})}
        if int(self.params["k"]) < 1 or float(self.params["temperature"]) <= 0:
            raise ValueError(f"neighbour votes need k >= 1 and temperature > 0, got {self.params}")

    @classmethod
    def fit(cls, X: np.ndarray, labels: Sequence[np.ndarray], *, max_pairs: int, **params: Any) -> NeighborVotes:
        """A memory of the newest ``max_pairs`` rows (rows in time order, as the datasets give them),
        rounded to float16 now, so the version is evaluated on exactly the memory it ships with."""
        start = max(0, X.shape[0] - int(max_pairs))
        return cls(np.asarray(X[start:], dtype=np.float16).astype(np.float32), [np.asarray(y)[start:] for y in labels], {k: v for k, v in params.items() if v is not None})

    @property
    def pairs(self) -> int:
        return int(self.X.shape[0])

    def probs(self, X: np.ndarray, n_classes: Sequence[int], *, chunk: int = 1024) -> list[np.ndarray]:
        """Per head, the (n, classes) vote distribution of each row of X."""
        n = X.shape[0]
        k = min(int(self.params["k"]), self.pairs)
        tau = float(self.params["temperature"])
        smooth = float(self.params["smoothing"])
        if n == 0 or k == 0:
            return [np.full((n, c), 1.0 / c) for c in n_classes]
        out = [np.zeros((n, c), dtype=np.float64) for c in n_classes]
        Q = np.asarray(X, dtype=np.float32)
        for start in range(0, n, chunk):  # bounded memory: a chunk x pairs similarity matrix at a time
            q = Q[start : start + chunk]
            # One request at a time (the gateway's case) without BLAS threads: OpenBLAS splits a
            # 10k-row product over both cores and, while the other core trains a student, waits about
            # 8 ms for it; einsum's single loop takes 0.5 ms.
            S = np.einsum("ij,kj->ik", q, self.X) if q.shape[0] <= _SINGLE_THREAD_ROWS else q @ self.X.T
            idx = np.argpartition(-S, k - 1, axis=1)[:, :k]
            sims = np.take_along_axis(S, idx, axis=1).astype(np.float64)
            w = np.exp((sims - sims.max(axis=1, keepdims=True)) / tau)
            w /= w.sum(axis=1, keepdims=True)
            rows = np.repeat(np.arange(start, start + S.shape[0]), k)
            for h, y in enumerate(self.labels):
                np.add.at(out[h], (rows, y[idx].ravel()), w.ravel())
        return [(1.0 - smooth) * p + smooth / p.shape[1] for p in out]

    # -- files ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        t = {"knn.X": self.X.astype(np.float16)}
        t.update({f"knn.y{i}": y.astype(np.int32) for i, y in enumerate(self.labels)})
        return t

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "pairs": self.pairs}

    @classmethod
    def from_saved(cls, body: dict[str, Any], tensors: dict[str, np.ndarray], heads: int) -> NeighborVotes:
        return cls(tensors["knn.X"].astype(np.float32), [tensors[f"knn.y{i}"] for i in range(heads)], body.get("params"))
