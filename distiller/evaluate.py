"""Evaluation of a student version against the teacher on held-back pairs.

Agreement overall, the coverage/agreement curve over confidence thresholds, the coverage and
threshold at the route's target agreement, and the calibration error (ECE) of the confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from router.agreement import agreement_kind, answers_agree
from router.calibration import expected_calibration_error, reliability_bins
from router.curve import coverage_at, coverage_curve, curve_to_json, effective_size, threshold_for_target

__all__ = ["agreement_vector", "evaluate_confidence"]


def agreement_vector(kind: str, student: Sequence[str | None], teacher: Sequence[str | None]) -> np.ndarray:
    """1.0 where the student agrees with the teacher (:func:`router.agreement.answers_agree` for the
    student ``kind``'s answers), else 0.0."""
    how = agreement_kind(kind)
    return np.array([1.0 if answers_agree(how, s, t) else 0.0 for s, t in zip(student, teacher)])


def evaluate_confidence(
    confidence: np.ndarray | Sequence[float],
    correct: np.ndarray | Sequence[float],
    *,
    target: float,
    extra_targets: Sequence[float] = (0.95, 0.98, 0.99),
    weights: np.ndarray | Sequence[float] | None = None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Metrics and curve of one version on one set of pairs.

    metrics: agreement, coverage_at_target, target_agreement, threshold_at_target (None when the
    target is never met), ece, pairs, effective_pairs, coverage_at {"0.95": ..} and the reliability
    bins. ``weights`` make agreement and the curve stand for the traffic (see
    :func:`router.curve.coverage_curve`); ECE and the reliability bins stay per pair.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    curve = coverage_curve(conf, corr, weights=weights)
    w = np.ones(len(corr)) if weights is None else np.asarray(weights, dtype=np.float64)
    metrics: dict[str, Any] = {
        "agreement": float((corr * w).sum() / w.sum()) if len(corr) and w.sum() > 0 else 0.0,
        "coverage_at_target": coverage_at(curve, target),
        "target_agreement": float(target),
        "threshold_at_target": threshold_for_target(curve, target),
        "ece": expected_calibration_error(conf, corr),
        "pairs": int(len(corr)),
        "effective_pairs": round(effective_size(weights, len(corr)), 1),
        "coverage_at": {f"{t:g}": coverage_at(curve, t) for t in extra_targets},
        "reliability": reliability_bins(conf, corr),
    }
    return metrics, curve_to_json(curve)
