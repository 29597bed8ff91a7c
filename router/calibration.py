"""Calibrators: turn a student's own score into the probability that it agrees with the teacher.

Fitted on the validation split (scores and 0/1 agreement), serialisable to JSON, applied with plain
numpy on the hot path. :func:`fit_calibrator` picks isotonic regression when there is enough
validation data and Platt scaling (a logistic curve on the score) otherwise; both are monotone, so
they never reorder requests, they only put honest numbers on them. :func:`expected_calibration_error`
measures how far the numbers are from the observed agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Calibrator",
    "IsotonicCalibrator",
    "PlattCalibrator",
    "IdentityCalibrator",
    "fit_calibrator",
    "calibrator_from_dict",
    "expected_calibration_error",
    "reliability_bins",
]


class Calibrator:
    """Maps raw scores to calibrated probabilities in [0, 1]."""

    method = "base"

    def __call__(self, scores: np.ndarray | Sequence[float] | float) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class IdentityCalibrator(Calibrator):
    """Scores taken as probabilities (clipped); used when there is nothing to fit on."""

    method = "identity"

    def __call__(self, scores: Any) -> np.ndarray:
        return np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method}


@dataclass
class PlattCalibrator(Calibrator):
    """p = sigmoid(a * score + b)."""

    a: float
    b: float
    method = "platt"

    def __call__(self, scores: Any) -> np.ndarray:
        z = self.a * np.asarray(scores, dtype=np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "a": self.a, "b": self.b}


@dataclass
class IsotonicCalibrator(Calibrator):
    """A non-decreasing step function through (x, y) knots, linearly interpolated."""

    x: list[float]
    y: list[float]
    method = "isotonic"

    def __call__(self, scores: Any) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        y = np.interp(s, np.asarray(self.x), np.asarray(self.y))
        # A tiny strictly increasing term breaks the ties inside a flat block, so the router can
        # still rank requests (and pick thresholds) finer than the blocks; it moves no value by
        # more than 1e-4.
        return np.clip(y * (1.0 - 1e-4) + 1e-4 * np.clip(s, 0.0, 1.0), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "x": self.x, "y": self.y}


def _pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: the weighted non-decreasing fit of ``y`` (already sorted by score)."""
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y, w):
        vals.append(float(yi))
        wts.append(float(wi))
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, s2 = vals.pop(), wts.pop(), sizes.pop()
            total = wts[-1] + w2
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / total
            wts[-1] = total
            sizes[-1] += s2
    return np.repeat(vals, sizes), np.asarray(sizes)


def _fit_isotonic(scores: np.ndarray, correct: np.ndarray, prior_strength: float) -> IsotonicCalibrator:
    order = np.argsort(scores, kind="mergesort")
    s, c = scores[order], correct[order].astype(np.float64)
    fitted, _ = _pav(c, np.ones_like(c))
    # Shrink each block toward the overall rate a little, so a block of 3 lucky hits does not
    # claim certainty (that would let the router serve on too little evidence).
    xs: list[float] = []
    ys: list[float] = []
    base = float(c.mean())
    i = 0
    n = len(s)
    while i < n:
        j = i
        while j + 1 < n and fitted[j + 1] == fitted[i]:
            j += 1
        count = j - i + 1
        y = (fitted[i] * count + base * prior_strength) / (count + prior_strength)
        xs.extend([float(s[i]), float(s[j])])
        ys.extend([y, y])
        i = j + 1
    ys_arr = np.maximum.accumulate(np.asarray(ys))  # shrinkage can break monotonicity slightly
    # Deduplicate x knots (np.interp needs non-decreasing x; equal x with different y keeps the last).
    x_out: list[float] = []
    y_out: list[float] = []
    for x, y in zip(xs, ys_arr):
        if x_out and x == x_out[-1]:
            y_out[-1] = float(y)
        else:
            x_out.append(x)
            y_out.append(float(y))
    return IsotonicCalibrator(x=x_out, y=y_out)


def _fit_platt(scores: np.ndarray, correct: np.ndarray) -> PlattCalibrator:
    # Newton's method on the logistic log-loss, with Platt's smoothed targets.
    pos = float(correct.sum())
    neg = float(len(correct) - pos)
    t = np.where(correct > 0, (pos + 1) / (pos + 2), 1 / (neg + 2))
    a, b = 1.0, 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * scores + b, -50, 50)))
        g = np.array([np.sum((p - t) * scores), np.sum(p - t)])
        wdiag = p * (1 - p) + 1e-9
        h = np.array(
            [[np.sum(wdiag * scores * scores), np.sum(wdiag * scores)], [np.sum(wdiag * scores), np.sum(wdiag)]]
        ) + 1e-6 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return PlattCalibrator(a=float(a), b=float(b))


def fit_calibrator(
    scores: np.ndarray | Sequence[float],
    correct: np.ndarray | Sequence[float],
    *,
    method: str = "auto",
    min_isotonic: int = 200,
    prior_strength: float = 2.0,
) -> Calibrator:
    """Fit a calibrator from validation scores and whether each answer agreed with the teacher.

    ``method`` is "isotonic", "platt", "identity" or "auto" (isotonic from ``min_isotonic`` examples
    up, Platt below). With no examples, or only one outcome, Platt's smoothed targets still give a
    sensible, conservative curve.
    """
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    if method == "identity" or len(s) == 0:
        return IdentityCalibrator()
    if method == "auto":
        method = "isotonic" if len(s) >= min_isotonic else "platt"
    if method == "isotonic":
        return _fit_isotonic(s, c, prior_strength)
    if method == "platt":
        return _fit_platt(s, c)
    raise ValueError(f"Unknown calibration method {method!r}; use isotonic, platt, identity or auto.")


def calibrator_from_dict(d: dict[str, Any] | None) -> Calibrator:
    """Rebuild a calibrator from :meth:`Calibrator.to_dict` output."""
    if not d or d.get("method") == "identity":
        return IdentityCalibrator()
    if d["method"] == "platt":
        return PlattCalibrator(a=float(d["a"]), b=float(d["b"]))
    if d["method"] == "isotonic":
        return IsotonicCalibrator(x=[float(v) for v in d["x"]], y=[float(v) for v in d["y"]])
    raise ValueError(f"Unknown calibration method {d.get('method')!r}.")


def reliability_bins(
    confidence: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[float], *, bins: int = 10
) -> list[dict[str, float]]:
    """Equal-width confidence bins: [{"lo", "hi", "count", "confidence", "agreement"}] (non-empty bins)."""
    p = np.asarray(confidence, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "count": int(m.sum()),
                    "confidence": float(p[m].mean()),
                    "agreement": float(c[m].mean()),
                }
            )
    return out


def expected_calibration_error(
    confidence: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[float], *, bins: int = 10
) -> float:
    """ECE: the count-weighted mean gap between stated confidence and observed agreement per bin."""
    p = np.asarray(confidence, dtype=np.float64)
    if len(p) == 0:
        return 0.0
    return float(
        sum(b["count"] * abs(b["confidence"] - b["agreement"]) for b in reliability_bins(p, correct, bins=bins))
        / len(p)
    )
