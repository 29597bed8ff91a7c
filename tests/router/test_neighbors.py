"""The nearest-neighbour view of a label student."""

from __future__ import annotations

import numpy as np
import pytest

from router.neighbors import NeighborVotes


def _unit(rows: list[list[float]]) -> np.ndarray:
    X = np.asarray(rows, dtype=np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_votes_follow_the_nearest_pairs_weighted_by_similarity() -> None:
    memory = _unit([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    votes = NeighborVotes(memory, [np.array([0, 0, 1, 1])], {"k": 2, "temperature": 0.05, "smoothing": 0.1})
    p = votes.probs(_unit([[1, 0.05], [0.05, 1]]), [2])[0]
    assert p.shape == (2, 2) and np.allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == pytest.approx(0.95) and p[1, 1] == pytest.approx(0.95)  # both neighbours agree: 1 - s/2
    # with k = 4 the far pairs vote too, but at exp(-Δsim / 0.05) they barely count
    wide = NeighborVotes(memory, [np.array([0, 0, 1, 1])], {"k": 4}).probs(_unit([[1, 0.05]]), [2])[0]
    assert 0.94 < wide[0, 0] < 0.95
    # between two classes the nearer one wins, by how much nearer it is
    split = NeighborVotes(memory, [np.array([0, 1, 1, 1])], {"k": 2}).probs(_unit([[1, 0]]), [2])[0]
    sims = memory[:2] @ np.array([1.0, 0.0])
    w = np.exp((sims - sims.max()) / 0.05)
    assert split[0, 0] == pytest.approx(0.9 * w[0] / w.sum() + 0.05, abs=1e-5)


def test_chunks_and_heads_give_the_same_votes_and_the_memory_round_trips() -> None:
    rng = np.random.default_rng(0)
    memory = _unit(rng.normal(size=(300, 16)).tolist())
    labels = [rng.integers(0, 5, 300), rng.integers(0, 3, 300)]
    votes = NeighborVotes.fit(memory, labels, max_pairs=250, k=7)
    assert votes.pairs == 250 and np.array_equal(votes.labels[0], labels[0][50:])  # the newest pairs kept
    queries = _unit(rng.normal(size=(40, 16)).tolist())
    whole = votes.probs(queries, [5, 3])
    chunked = votes.probs(queries, [5, 3], chunk=6)
    assert all(np.allclose(a, b) for a, b in zip(whole, chunked))
    saved = NeighborVotes.from_saved(votes.to_dict(), votes.tensors(), heads=2)
    assert saved.params == votes.params and votes.to_dict()["pairs"] == 250
    # fit rounds to float16, so the saved memory gives exactly the votes that were evaluated
    assert all(np.array_equal(a, b) for a, b in zip(whole, saved.probs(queries, [5, 3])))


def test_bad_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="label rows"):
        NeighborVotes(np.zeros((3, 4)), [np.zeros(2)])
    with pytest.raises(ValueError, match="temperature"):
        NeighborVotes(np.zeros((3, 4)), [np.zeros(3)], {"temperature": 0})
