"""An LM student's confidence: features of its answer's token logprobs and the calibrator over them.

:func:`logprob_features` (mean, minimum, low quantiles and length of the answer's token logprobs:
the sum alone is length-biased) and :class:`Calibrator` (a logistic model over those features plus a
PCA-reduced prompt embedding, stored as JSON, applied with numpy). :func:`confidence_for` scores a
batch the same way for every backend (embedded or vLLM).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.student import StudentError
from router.text import message_text

__all__ = ["FEATURE_NAMES", "logprob_features", "DECISION_FEATURES", "VIEW_FEATURES", "decision_features",
           "answer_features", "answer_feature_names", "Calibrator", "prompt_text",
           "embed_prompts", "confidence_for"]

FEATURE_NAMES = ["mean", "min", "q10", "q25", "last", "log_len"]
DECISION_FEATURES = ["min", "mean", "sum", "log_n", "min_label", "min_key", "min_first", "min_cont", "min_margin"]
VIEW_FEATURES = ["views_agree", "alt_min"]  # students that answer in two orders (router.lm_grammar.RouteSchema.views)


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


def decision_features(decisions: Sequence[Any]) -> np.ndarray:
    """Features of a structured answer's decisions (:class:`router.lm_decode.Decision`), in
    :data:`DECISION_FEATURES` order.

    Only decisions count: a forced step carries no information. Over all of them the minimum, mean
    and sum of the log-probabilities (each over the ids the grammar allowed) and log(1 + how many);
    the minimum per kind of decision (a label, a key or the end, a span's first token, a span going
    on or ending), since one unsure span start sinks an answer however sure the rest is; and the smallest gap
    between the chosen id and the runner-up.
    """
    lp = np.array([d.logprob for d in decisions], dtype=np.float64) if decisions else np.zeros(1)
    lp = np.maximum(lp, -50.0)

    def lowest(kinds: tuple[str, ...]) -> float:
        values = [max(d.logprob, -50.0) for d in decisions if d.kind in kinds]
        return float(min(values)) if values else 0.0

    margin = min((d.margin for d in decisions), default=10.0)
    return np.array([lp.min(), lp.mean(), lp.sum(), math.log1p(len(decisions)), lowest(("label",)),
                     lowest(("key", "eos")), lowest(("first",)), lowest(("cont", "end")), min(margin, 10.0)])


def answer_feature_names(views: int) -> list[str]:
    """The confidence features of a student that answers in ``views`` orders."""
    return DECISION_FEATURES + (VIEW_FEATURES if views > 1 else [])


def answer_features(result: Any) -> np.ndarray:
    """A decoded answer's confidence features (:func:`answer_feature_names`): its decisions'
    (:func:`decision_features`), and where it was answered in two orders whether they agreed and the
    other order's weakest decision. Two orders that reach the same object by different decisions are
    evidence no single decode gives: on SNIPS (Gemma 3, 2,000 pairs) the answers both orders agreed on
    were right 87% of the time, the others 39%."""
    feats = decision_features(result.decisions)
    if getattr(result, "views_agree", None) is None:
        return feats
    alt = [max(d.logprob, -50.0) for d in result.alt_decisions]
    return np.concatenate([feats, [float(result.views_agree), min(alt) if alt else 0.0]])


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
