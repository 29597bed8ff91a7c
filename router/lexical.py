"""Lexical features of a label student: TF-IDF over word 1-2-grams of the varying text.

A sentence encoder and a bag of words make different mistakes: the encoder knows that "my card has
not come" and "where is my card" mean the same, the n-grams know that "top up" and "top-up by
cheque" are different intents. A label student blends a head on each (see
:class:`router.label_student.LabelModel`); on banking77 at 2k pairs the blend covers 75% of held-back
requests at 98% agreement where the embedding head alone covers 71%.

Stored without pickle: the vocabulary in ``student.json`` (terms in column order) and the IDF weights
in ``heads.safetensors``; loading rebuilds an identical scikit-learn vectorizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LexicalFeatures", "EmptyVocabulary"]


class EmptyVocabulary(ValueError):
    """No term occurs often enough in the training texts to build features."""


_DEFAULTS: dict[str, Any] = {"ngram_max": 2, "min_df": 2, "max_features": 50000}


class LexicalFeatures:
    """A fitted TF-IDF vectorizer (lower-cased word n-grams, sublinear tf, L2-normalized rows)."""

    def __init__(self, vectorizer: Any, params: dict[str, Any]):
        self._vec = vectorizer
        self.params = params

    @staticmethod
    def _make(params: dict[str, Any], vocabulary: dict[str, int] | None = None) -> Any:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(
            ngram_range=(1, int(params["ngram_max"])),
            sublinear_tf=True,
            min_df=1 if vocabulary is not None else int(params["min_df"]),
            max_features=None if vocabulary is not None else int(params["max_features"]),
            vocabulary=vocabulary,
            dtype=np.float32,
        )

    @classmethod
    def fit(cls, texts: Sequence[str], **params: Any) -> LexicalFeatures:
        """Learn the vocabulary and IDF weights; raises :class:`EmptyVocabulary` when no term qualifies."""
        p = {**_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
        vec = cls._make(p)
        try:
            vec.fit(list(texts))
        except ValueError as exc:  # scikit-learn: "empty vocabulary" / "no terms remain"
            raise EmptyVocabulary(str(exc)) from exc
        return cls(vec, p)

    @property
    def dim(self) -> int:
        return len(self._vec.vocabulary_)

    def transform(self, texts: Sequence[str]) -> Any:
        """A (n, dim) float32 CSR matrix."""
        return self._vec.transform(list(texts))

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON part: parameters and the terms in column order (the IDF goes to safetensors)."""
        terms = [""] * self.dim
        for term, j in self._vec.vocabulary_.items():
            terms[j] = term
        return {"params": self.params, "terms": terms}

    @property
    def idf(self) -> np.ndarray:
        return np.asarray(self._vec.idf_, dtype=np.float32)

    @classmethod
    def from_saved(cls, body: dict[str, Any], idf: np.ndarray) -> LexicalFeatures:
        terms = list(body["terms"])
        if len(terms) != len(idf):
            raise ValueError(f"lexical features: {len(terms)} terms but {len(idf)} IDF weights")
        params = {**_DEFAULTS, **(body.get("params") or {})}
        vec = cls._make(params, vocabulary={t: j for j, t in enumerate(terms)})
        vec.fit([""] if not terms else terms[:1])  # sets up the fixed vocabulary; IDF is replaced below
        vec.idf_ = np.asarray(idf, dtype=np.float64)
        return cls(vec, params)
