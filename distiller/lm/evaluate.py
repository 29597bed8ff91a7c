"""Evaluate an LM student against its teacher and calibrate its confidence.

Agreement is the project's one definition (:mod:`router.agreement`): parsed-JSON equality for a route
whose answers are JSON, normalised exact match for free text (the gateway's shadow checks and drift
monitor judge served answers the same way). Optionally the teacher judges a sample, and its cost is
recorded beside it.

The confidence is :class:`router.lm_student.Calibrator` fitted on validation agreement, from the
student's own token logprobs (:func:`router.lm_student.logprob_features`) and the prompt embedding.
A good student is right on nearly every validation prompt, which leaves a logistic model nothing to
learn from; when wrong answers are scarce, sampled (temperature 1) answers to the same prompts are
added to the calibration set, labelled the same way. The routing curve and ECE come from
out-of-fold predictions on the greedy answers only (what is actually served).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distiller.lm.config import LMTrainConfig
from router.agreement import answers_agree, canonical
from router.calibration import expected_calibration_error
from router.curve import coverage_at, coverage_curve, threshold_for_target
from router.lm_student import Calibrator, Generation, LMEngine, embed_prompts, logprob_features, prompt_text

__all__ = [
    "normalize",
    "agreement",
    "answer_format",
    "generate_answers",
    "fit_calibrator",
    "coverage_curve",
    "at_target",
    "expected_calibration_error",
    "auroc",
    "EvalReport",
    "evaluate_student",
]

log = logging.getLogger(__name__)

MIN_NEGATIVES = 5  # fewer wrong validation answers than this: add sampled answers for calibration


def normalize(text: str) -> str:
    """Text as compared for free-text agreement (:func:`router.agreement.canonical`)."""
    return canonical("text", text)


def answer_format(answers: Sequence[str]) -> str:
    """``json`` when every answer is a JSON object (an extraction route), else ``text``."""
    import json

    def is_object(a: str) -> bool:
        try:
            return isinstance(json.loads(a), dict)
        except ValueError:
            return False

    return "json" if answers and all(is_object(a) for a in answers) else "text"


def agreement(teachers: Sequence[str], students: Sequence[str], *, kind: str = "text") -> np.ndarray:
    """Per pair, whether the student agrees with the teacher (:func:`router.agreement.answers_agree`)."""
    return np.array([answers_agree(kind, s, t) for t, s in zip(teachers, students)], dtype=bool)


def generate_answers(
    engine: LMEngine,
    chats: Sequence[Sequence[dict[str, Any]]],
    *,
    max_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[Generation]:
    """Generate answers for ``chats`` in batches of ``batch_size``."""
    out: list[Generation] = []
    for start in range(0, len(chats), batch_size):
        out.extend(
            engine.generate(
                chats[start : start + batch_size],
                max_tokens=max_tokens,
                temperature=temperature,
                seed=None if seed is None else seed + start,
            )
        )
    return out


def _pca(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    mean = embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    return mean, vt[: max(1, min(k, vt.shape[0]))]


def fit_calibrator(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    embeddings: np.ndarray | None = None,
    embedding_model: str | None = None,
    components: int = 4,
) -> Calibrator:
    """Fit a logistic calibrator (features [+ PCA of embeddings]); constant if one class only."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int)
    pos, n = int(labels.sum()), len(labels)
    if pos == 0 or pos == n:
        # one outcome only: the Laplace-smoothed rate is all the data supports
        return Calibrator(kind="constant", mean=[], scale=[], coef=[], intercept=0.0, constant=(pos + 1) / (n + 2))
    cal = Calibrator(kind="logistic", mean=[], scale=[], coef=[], intercept=0.0)
    if embeddings is not None and embedding_model:
        pca_mean, comps = _pca(np.asarray(embeddings, dtype=np.float64), components)
        cal.embedding_model, cal.pca_mean, cal.components = embedding_model, pca_mean.tolist(), comps.tolist()
    x = cal.design(features, embeddings)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    model = LogisticRegression(C=1.0, max_iter=1000, class_weight=None)
    model.fit((x - mean) / scale, labels)
    cal.mean, cal.scale = mean.tolist(), scale.tolist()
    cal.coef, cal.intercept = model.coef_[0].tolist(), float(model.intercept_[0])
    return cal


def at_target(curve: list[dict[str, float]], target: float) -> tuple[float, float]:
    """(coverage, threshold) of the widest point on ``curve`` whose agreement reaches ``target``
    (:mod:`router.curve`, the label students' curve). Nothing qualifies: coverage 0 and threshold
    1.0 (every request escalates)."""
    threshold = threshold_for_target(curve, target)
    return (coverage_at(curve, target), float(threshold)) if threshold is not None else (0.0, 1.0)


def auroc(confidence: np.ndarray, agree: np.ndarray) -> float | None:
    """Area under the ROC curve of confidence separating agreeing from disagreeing answers."""
    from sklearn.metrics import roc_auc_score

    agree = np.asarray(agree).astype(int)
    if agree.min() == agree.max():
        return None
    return float(roc_auc_score(agree, confidence))


@dataclass
class EvalReport:
    metrics: dict[str, Any]
    curve: list[dict[str, float]]
    calibrator: Calibrator
    confidence: np.ndarray
    agree: np.ndarray
    answers: list[str]


def _out_of_fold(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, embeddings: np.ndarray | None, config: LMTrainConfig
) -> np.ndarray | None:
    from sklearn.model_selection import GroupKFold

    n_neg, n_pos = int((labels == 0).sum()), int((labels == 1).sum())
    folds = min(5, n_neg, n_pos, len(np.unique(groups)))
    if folds < 2:
        return None
    pred = np.zeros(len(labels))
    for train_idx, test_idx in GroupKFold(n_splits=folds).split(features, labels, groups):
        cal = fit_calibrator(
            features[train_idx],
            labels[train_idx],
            embeddings=None if embeddings is None else embeddings[train_idx],
            embedding_model=config.embedding_model if embeddings is not None else None,
            components=config.embedding_components,
        )
        pred[test_idx] = cal.predict(features[test_idx], None if embeddings is None else embeddings[test_idx])
    return pred


def evaluate_student(
    model: Any,
    tokenizer: Any,
    val_pairs: Sequence[Any],
    config: LMTrainConfig,
    *,
    target: float,
    device: str = "cpu",
    judge: Callable[[list[dict[str, Any]], str, str], tuple[bool, float]] | None = None,
) -> EvalReport:
    """Answer the validation prompts, measure agreement with the teacher, fit the calibrator.

    ``metrics`` holds ``agreement``, ``exact_agreement``, ``coverage_at_target``,
    ``target_agreement``, ``threshold_at_target``, ``ece``, ``auroc`` (None with one outcome),
    ``calibration_rows``, ``calibration_sampled`` and, with a judge, ``judge_agreement`` and
    ``judge_cost_usd``.
    """
    engine = LMEngine(model, tokenizer, device=device)
    chats = [p.messages for p in val_pairs]
    teachers = [p.answer for p in val_pairs]
    greedy = generate_answers(engine, chats, max_tokens=config.max_new_tokens, batch_size=config.eval_batch_size)
    answers = [g.text for g in greedy]
    kind = answer_format(teachers)
    agree = agreement(teachers, answers, kind=kind)
    exact = np.array([normalize(t) == normalize(s) for t, s in zip(teachers, answers)])
    features = np.vstack([logprob_features(g.token_logprobs) for g in greedy])
    labels = agree.astype(int)
    groups = np.arange(len(val_pairs))
    is_greedy = np.ones(len(val_pairs), dtype=bool)
    sampled = 0
    if int((labels == 0).sum()) < MIN_NEGATIVES and config.calibration_samples > 0:
        extra_f, extra_l, extra_g = [], [], []
        for r in range(config.calibration_samples):
            gens = generate_answers(
                engine,
                chats,
                max_tokens=config.max_new_tokens,
                batch_size=config.eval_batch_size,
                temperature=1.0,
                seed=config.seed + 1000 * (r + 1),
            )
            ok = agreement(teachers, [g.text for g in gens], kind=kind)
            extra_f.extend(logprob_features(g.token_logprobs) for g in gens)
            extra_l.extend(ok.astype(int))
            extra_g.extend(range(len(val_pairs)))
        sampled = len(extra_l)
        features = np.vstack([features, np.vstack(extra_f)])
        labels = np.concatenate([labels, np.asarray(extra_l)])
        groups = np.concatenate([groups, np.asarray(extra_g)])
        is_greedy = np.concatenate([is_greedy, np.zeros(sampled, dtype=bool)])
    embeddings = None
    if config.prompt_embedding:
        prompt_emb = embed_prompts([prompt_text(c) for c in chats], config.embedding_model).astype(np.float64)
        embeddings = prompt_emb[groups]
    calibrator = fit_calibrator(
        features,
        labels,
        embeddings=embeddings,
        embedding_model=config.embedding_model if embeddings is not None else None,
        components=config.embedding_components,
    )
    oof = _out_of_fold(features, labels, groups, embeddings, config)
    if oof is None:
        confidence = calibrator.predict(features[is_greedy], None if embeddings is None else embeddings[is_greedy])
    else:
        confidence = oof[is_greedy]
    # shadow checks stand for the served requests they sampled (distiller.dataset.weighted_pairs)
    curve = coverage_curve(confidence, agree.astype(float), max_points=None,
                           weights=[float(getattr(p, "weight", 1.0)) for p in val_pairs])
    coverage, threshold = at_target(curve, target)
    metrics: dict[str, Any] = {
        "agreement": float(agree.mean()),
        "exact_agreement": float(exact.mean()),
        "coverage_at_target": float(coverage),
        "target_agreement": float(target),
        "threshold_at_target": float(threshold),
        "ece": expected_calibration_error(confidence, agree),
        "auroc": auroc(confidence, agree),
        "val_pairs": len(val_pairs),
        "calibration_rows": int(len(labels)),
        "calibration_sampled": int(sampled),
        "calibrator": calibrator.kind,
    }
    if judge is not None and config.judge_sample > 0:
        n = min(config.judge_sample, len(val_pairs))
        verdicts, cost = [], 0.0
        for i in range(n):
            ok, usd = judge(list(chats[i]), teachers[i], answers[i])
            verdicts.append(bool(ok))
            cost += float(usd)
        metrics["judge_agreement"] = float(np.mean(verdicts)) if verdicts else None
        metrics["judge_sample"] = n
        metrics["judge_cost_usd"] = cost
    return EvalReport(metrics=metrics, curve=curve, calibrator=calibrator, confidence=confidence, agree=agree, answers=answers)
