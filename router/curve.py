"""The coverage/agreement curve of a student, and the threshold that meets a target agreement.

For a confidence threshold t, the student would serve the requests whose confidence is >= t:
``coverage`` is their share of all requests and ``agreement`` how often the student's answer then
equals the teacher's. Lowering t serves more and usually agrees less. The router picks, for a
route's target agreement (say 0.98), the lowest threshold that still meets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["coverage_curve", "threshold_for_target", "coverage_at", "point_at", "effective_size", "CurvePoint"]

CurvePoint = dict[str, float]  # {"threshold", "coverage", "agreement", "pairs"}


def coverage_curve(
    confidence: np.ndarray | Sequence[float],
    correct: np.ndarray | Sequence[float],
    *,
    max_points: int | None = 200,
    weights: np.ndarray | Sequence[float] | None = None,
) -> list[CurvePoint]:
    """The curve over every distinct confidence value, highest threshold first.

    Each point says: serving requests with confidence >= ``threshold`` covers ``coverage`` of them
    with ``agreement`` (1.0 when nothing is served); ``pairs`` is how many of the scored pairs that
    is (the evidence behind the point).

    ``weights`` (default 1) say how many requests of the traffic each pair stands for: a shadow check
    of a student-served request sampled at 2% stands for 50. Coverage counts the full weight. For
    agreement, each pair counts its observed outcome once and the ``w - 1`` requests it stands in for
    count at its calibrated ``confidence`` (the expected agreement of a request with that score): a
    handful of heavily weighted checks then cannot swing the curve by 50 requests per outcome, and the
    curve still describes the traffic rather than the escalation-heavy sample.

    With ``max_points``, the curve is thinned to about that many points, always keeping the points
    with the largest coverage at each agreement.
    """
    p = np.asarray(confidence, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.maximum(np.asarray(weights, dtype=np.float64), 1.0)
    n = len(p)
    if n == 0:
        return []
    order = np.argsort(-p, kind="mergesort")
    ps, cs, ws = p[order], c[order], w[order]
    hits = np.cumsum(cs + (ws - 1.0) * np.clip(ps, 0.0, 1.0))
    mass = np.cumsum(ws)
    total = mass[-1]
    # The last index of each run of equal confidence: a threshold serves the whole run or none of it.
    ends = np.nonzero(np.r_[ps[1:] != ps[:-1], True])[0]
    points = [
        {"threshold": float(ps[e]), "coverage": float(mass[e] / total), "agreement": float(hits[e] / mass[e]),
         "pairs": float(e + 1)}
        for e in ends
    ]
    if max_points is not None and len(points) > max_points:
        keep = set(np.linspace(0, len(points) - 1, max_points).round().astype(int).tolist())
        # Keep the exact frontier points too, so the thinned curve gives the same answer to
        # threshold_for_target at common targets.
        for target in (0.9, 0.95, 0.97, 0.98, 0.99, 0.995):
            best = _best_index(points, target)
            if best is not None:
                keep.add(best)
        points = [points[i] for i in sorted(keep)]
    return points


def effective_size(weights: np.ndarray | Sequence[float] | None, n: int) -> float:
    """Kish's effective sample size of weighted pairs, (sum w)^2 / sum w^2 (``n`` when unweighted):
    what confidence bounds on a weighted curve should count as the number of pairs."""
    if weights is None:
        return float(n)
    w = np.asarray(weights, dtype=np.float64)
    sq = float((w * w).sum())
    return float(w.sum() ** 2 / sq) if sq > 0 else 0.0


def _best_index(curve: Sequence[CurvePoint], target: float) -> int | None:
    best = None
    for i, pt in enumerate(curve):
        if pt["agreement"] >= target - 1e-12 and (best is None or pt["coverage"] > curve[best]["coverage"]):
            best = i
    return best


def threshold_for_target(curve: Sequence[CurvePoint], target: float) -> float | None:
    """The confidence threshold that serves the most traffic while agreeing at least ``target``.

    Among the curve's points whose agreement is >= ``target`` it takes the one with the largest
    coverage and returns its threshold: serve a request when its confidence >= that value. Returns
    None when no threshold reaches the target (the route should then always escalate).
    """
    best = _best_index(curve, target)
    return None if best is None else float(curve[best]["threshold"])


def coverage_at(curve: Sequence[CurvePoint], target: float) -> float:
    """The coverage at :func:`threshold_for_target` (0.0 when the target is never reached)."""
    best = _best_index(curve, target)
    return 0.0 if best is None else float(curve[best]["coverage"])


def point_at(curve: Sequence[CurvePoint], threshold: float) -> CurvePoint | None:
    """The point describing what serving at ``threshold`` does (the served point with the largest
    coverage: on a full curve, exactly the requests with confidence >= ``threshold``); None when
    nothing is served."""
    served = [pt for pt in curve if pt["threshold"] >= threshold]
    return max(served, key=lambda pt: pt["coverage"]) if served else None


def curve_to_json(curve: Sequence[CurvePoint]) -> list[dict[str, Any]]:
    """Round the curve for storage (6 decimals is far below any decision the router makes)."""
    return [{k: round(float(v), 6) for k, v in pt.items()} for pt in curve]
