"""Per-route routing policy: pure decisions, no I/O.

Modes
    off      the teacher answers everything (still logged: the training data keeps coming)
    shadow   the teacher answers; the student answers on the side and is scored
    cascade  the student answers when its calibrated confidence >= the route's threshold;
             otherwise the request escalates to the teacher

A threshold is set directly, or derived from a target agreement on the live version's validation
curve (the lowest threshold whose served share still agrees with the teacher at the target, with
``target_confidence``, 95% by default, that it really does: a one-sided Wilson bound on the pairs
behind each point of the curve).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from router.curve import coverage_at, point_at, threshold_for_target

__all__ = [
    "Decision",
    "effective_threshold",
    "certified_share",
    "certainty_z",
    "DEFAULT_TARGET_CONFIDENCE",
    "decide",
    "ready_for_cascade",
    "LiveAgreement",
    "NEVER",
]

NEVER = math.inf  # a threshold no confidence reaches: no point of the curve meets the target
DEFAULT_TARGET_CONFIDENCE = 0.95


def certainty_z(confidence: float | None) -> float:
    """The one-sided normal quantile of a route's ``target_confidence`` (None: 95%, z = 1.645).

    0.5 gives z = 0: the plain validation curve, no allowance for how few pairs stand behind it.
    Lower confidence serves more of a young student's traffic and risks agreeing below the target;
    the drift monitor (:meth:`LiveAgreement.drifted`) is then the only guard.
    """
    c = DEFAULT_TARGET_CONFIDENCE if confidence is None else float(confidence)
    if not 0.5 <= c < 1.0:
        raise ValueError(f"target_confidence must be in [0.5, 1), got {c}")
    return NormalDist().inv_cdf(c)


@dataclass(frozen=True)
class Decision:
    use_student: bool
    reason: str  # "confident" | "below_threshold" | "forced_teacher" | "no_escalation" | "mode_off" | ...


def wilson_lower(agreement: float, n: float, z: float = 1.645) -> float:
    """One-sided lower confidence bound (95% by default) of an agreement measured on ``n`` pairs."""
    if n <= 0:
        return 0.0
    denom = 1 + z * z / n
    centre = agreement + z * z / (2 * n)
    spread = z * math.sqrt(max(agreement * (1 - agreement), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / denom)


def wilson_upper(agreement: float, n: float, z: float = 1.645) -> float:
    """One-sided upper confidence bound (95% by default) of an agreement measured on ``n`` pairs."""
    return 1.0 - wilson_lower(1.0 - agreement, n, z)


def conservative_curve(
    curve: Sequence[dict[str, float]], n_val: int | None, confidence: float | None = None
) -> list[dict[str, float]]:
    """The curve with each point's agreement replaced by its one-sided lower bound at ``confidence``
    (a route's ``target_confidence``; None: 95%).

    A threshold chosen on the raw curve of a small validation split is optimistic: 28 pairs all
    right at the top says little about the next 10,000 requests. With the bound, a target is met only
    where the evidence supports it, so young students serve less, and the share grows with the data.
    """
    if not n_val and not (curve and "pairs" in curve[0]):
        return list(curve)
    z = certainty_z(confidence)
    # the evidence behind a point: the pairs scored there (older curves: coverage x validation pairs)
    return [{**p, "agreement": wilson_lower(p["agreement"], p.get("pairs", p["coverage"] * (n_val or 0)), z)}
            for p in curve]


def effective_threshold(settings: dict[str, Any], curve: Sequence[dict[str, float]] | None, n_val: int | None = None) -> float:
    """The confidence a student answer needs: the route's own threshold, else the lowest threshold at
    which the live version's validation curve meets the target agreement with the route's
    ``target_confidence`` (95% unless set)."""
    if settings.get("threshold") is not None:
        return float(settings["threshold"])
    target = settings.get("target_agreement")
    if target is None or not curve:
        return NEVER
    bounded = conservative_curve(curve, n_val, settings.get("target_confidence"))
    threshold = threshold_for_target(bounded, float(target))
    return NEVER if threshold is None else float(threshold)


def expected_at(curve: Sequence[dict[str, float]], threshold: float) -> dict[str, float]:
    """What the validation curve predicts at a threshold: the share served and its agreement."""
    best = point_at(curve, threshold)
    if best is None:
        return {"coverage": 0.0, "agreement": 1.0}
    return {"coverage": float(best["coverage"]), "agreement": float(best["agreement"])}


def certified_share(settings: dict[str, Any], curve: Sequence[dict[str, float]] | None) -> float:
    """The share of traffic a version's curve certifies for the route's target: the coverage the
    curve predicts at :func:`effective_threshold` (0.0 when no threshold meets the target)."""
    threshold = effective_threshold(settings, curve)
    return float(expected_at(curve or [], threshold)["coverage"]) if threshold < NEVER else 0.0


def decide(*, mode: str, confidence: float, threshold: float, force_teacher: bool = False, forbid_escalation: bool = False) -> Decision:
    """Whether a cascade request is answered by the student (``confidence`` is calibrated)."""
    if mode != "cascade":
        return Decision(False, f"mode_{mode}")
    if force_teacher:
        return Decision(False, "forced_teacher")
    if forbid_escalation:
        return Decision(True, "no_escalation")
    if confidence >= threshold:
        return Decision(True, "confident")
    return Decision(False, "below_threshold")


def ready_for_cascade(
    metrics: dict[str, Any], curve: Sequence[dict[str, float]] | None, target: float, *, n_val: int | None = None,
    min_coverage: float = 0.01, confidence: float | None = None,
) -> bool:
    """A live student earns cascade when, on validation, it meets the target (with ``confidence``,
    95% unless given) on a useful share of requests."""
    if curve:
        return coverage_at(conservative_curve(curve, n_val, confidence), target) >= min_coverage
    return float(metrics.get("coverage_at_target") or 0.0) >= min_coverage


class LiveAgreement:
    """Agreement of served student answers with the teacher over the last ``window`` shadow checks,
    each weighted by the inverse of the probability it was checked with.

    Checks are sampled more where the student is least sure (``router.certify.check_probability``),
    and that is where its mistakes are: the plain share of agreeing checks is biased low. In a
    banking77 replay it paused a version that agreed 99.3% on validation after 27 of its first 30
    checks agreed, and the route served nothing for the rest of the stream. Weighted, the window
    estimates the agreement of what is served; the bound uses the weights' effective number of checks.
    """

    def __init__(self, window: int = 200):
        self.checks: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, agree: bool, weight: float = 1.0) -> None:
        self.checks.append((1 if agree else 0, max(float(weight), 1e-9)))

    @property
    def n(self) -> int:
        return len(self.checks)

    @property
    def effective_n(self) -> float:
        """Kish's effective number of checks, (sum w)^2 / sum w^2 (``n`` when the weights are equal)."""
        total = sum(w for _, w in self.checks)
        squares = sum(w * w for _, w in self.checks)
        return total * total / squares if squares > 0 else 0.0

    @property
    def agreement(self) -> float | None:
        if not self.checks:
            return None
        return sum(a * w for a, w in self.checks) / sum(w for _, w in self.checks)

    def drifted(self, target: float, *, min_checks: int = 30, z: float = 2.326) -> bool:
        """True when enough checks show agreement significantly under the target: even the upper end of
        a one-sided 99% Wilson interval on the (weighted) window is below it.

        The monitor looks again after every check, so the test must be strict: a plain "window average
        under the target minus 2 points" fires on 2 mismatches in 30 checks, which a student at exactly
        98% produces 12% of the time (in a banking77 replay it paused a route whose student agreed 98.2%
        on the next 1,400 pairs, for 150 s). A teacher that changes its answers still trips it at once:
        27 of 30 is enough against a 98% target, and 190 of 200.
        """
        agreement = self.agreement
        if self.n < min_checks or agreement is None:
            return False
        return wilson_upper(agreement, self.effective_n, z) < target

    def reset(self) -> None:
        self.checks.clear()
