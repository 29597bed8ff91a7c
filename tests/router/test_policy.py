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
