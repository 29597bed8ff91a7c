"""Evaluation of a student version against the teacher on held-back pairs.

Agreement overall, the coverage/agreement curve over confidence thresholds, the coverage and
threshold at the route's target agreement, and the calibration error (ECE) of the confidence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from distiller.detect import label_key
from router.calibration import expected_calibration_error, reliability_bins
from router.curve import coverage_at, coverage_curve, curve_to_json, effective_size, threshold_for_target

__all__ = ["answers_agree", "agreement_vector", "evaluate_confidence"]


def answers_agree(kind: str, student: str, teacher: str) -> bool:
    """Whether a student answer counts as the teacher's: same label (whitespace/case aside), or
    the same JSON object for structured routes (key order and spacing are formatting)."""
    if kind == "structured":
        try:
            return json.loads(student) == json.loads(teacher)
        except ValueError:
            return False
    return label_key(student) == label_key(teacher)


def agreement_vector(kind: str, student: Sequence[str], teacher: Sequence[str]) -> np.ndarray:
    """1.0 where the student agrees with the teacher, else 0.0."""
    return np.array([1.0 if answers_agree(kind, s, t) else 0.0 for s, t in zip(student, teacher)])


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
