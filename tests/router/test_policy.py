"""The router's drift monitor (pure logic)."""

from __future__ import annotations

import random

from router.policy import LiveAgreement


def _alarms(monitor: LiveAgreement, rng: random.Random, agreement: float, checks: int, target: float = 0.98) -> list[int]:
    out = []
    for i in range(checks):
        monitor.add(rng.random() < agreement)
        if monitor.drifted(target):
            out.append(i)
    return out


def test_drift_monitor_ignores_chance_but_catches_a_teacher_that_changed() -> None:
    rng = random.Random(0)
    monitor = LiveAgreement()
    # a student at 98.5% against a 98% target, looked at after each of 3,000 checks: never paused
    assert _alarms(monitor, rng, 0.985, 3000) == []
    # the teacher changes its answers and the student now agrees 60% of the time: paused within 40 checks
    dropped = _alarms(monitor, rng, 0.60, 200)
    assert dropped and dropped[0] < 40
    # a young window: 2 mismatches in 30 checks is chance at 98%, 3 is not
    young = LiveAgreement()
    for agree in [True] * 28 + [False] * 2:
        young.add(agree)
    assert not young.drifted(0.98)
    young.add(False)
    assert young.drifted(0.98)


def _mixed_curve() -> list[dict[str, float]]:
    """1,200 validation pairs: 8 misses among the 1,000 most confident, a quarter of the rest wrong."""
    import numpy as np

    from router.curve import coverage_curve

    conf = np.linspace(0.999, 0.5, 1200)
    correct = np.ones(1200)
    correct[np.arange(50, 1000, 120)] = 0.0
    correct[1000:][::4] = 0.0
    return coverage_curve(conf, correct, max_points=None)


def test_target_confidence_sets_how_much_evidence_a_threshold_needs() -> None:
    import numpy as np
    import pytest

    from router.curve import coverage_curve, threshold_for_target
    from router.policy import NEVER, effective_threshold, ready_for_cascade

    curve = _mixed_curve()
    plain = threshold_for_target(curve, 0.98)
    at = {c: effective_threshold({"target_agreement": 0.98, "target_confidence": c}, curve) for c in (0.5, 0.8, 0.95, 0.99)}
    assert at[0.5] == plain  # z = 0: the plain curve
    # the surer the router must be, the higher the threshold (the fewer requests the student serves)
    assert at[0.5] < at[0.8] < at[0.95] < at[0.99] < NEVER
    assert effective_threshold({"target_agreement": 0.98}, curve) == at[0.95]  # the default
    # a young curve: 30 pairs all right certify 98% at 50% confidence, not at 95%
    young = coverage_curve(np.linspace(0.99, 0.9, 30), np.ones(30), max_points=None)
    assert effective_threshold({"target_agreement": 0.98}, young) == NEVER
    assert not ready_for_cascade({}, young, 0.98)
    assert ready_for_cascade({}, young, 0.98, confidence=0.5)
    # a set threshold wins over the target either way
    assert effective_threshold({"threshold": 0.7, "target_agreement": 0.98, "target_confidence": 0.99}, curve) == 0.7
    with pytest.raises(ValueError):
        effective_threshold({"target_agreement": 0.98, "target_confidence": 1.0}, curve)


def test_certified_share_is_the_coverage_at_the_routes_threshold() -> None:
    import numpy as np

    from router.curve import coverage_curve
    from router.policy import certified_share, effective_threshold, expected_at

    curve = _mixed_curve()
    settings = {"target_agreement": 0.98, "target_confidence": 0.95}
    share = certified_share(settings, curve)
    assert share == expected_at(curve, effective_threshold(settings, curve))["coverage"]
    assert 0.5 < share < 1.0  # the top holds few misses, the least confident quarter of the rest is wrong
    assert certified_share({**settings, "target_confidence": 0.99}, curve) < share
    young = coverage_curve(np.linspace(0.99, 0.9, 30), np.ones(30), max_points=None)
    assert certified_share(settings, young) == 0.0  # nothing certified: no threshold
    assert certified_share(settings, None) == 0.0
