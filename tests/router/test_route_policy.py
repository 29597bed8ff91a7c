"""Every transition of the route policy, as pure logic (router/route_policy.py)."""

from __future__ import annotations

import math

from router.route_policy import LiveVersion, RoutePolicy


def _curve(agreement: float, pairs: int = 2000) -> list[dict[str, float]]:
    """A curve that serves everything at this agreement, on this many pairs."""
    return [{"threshold": t, "coverage": c, "agreement": agreement, "pairs": int(pairs * c)}
            for t, c in ((0.9, 0.5), (0.5, 0.8), (0.1, 1.0))]


GOOD = LiveVersion(1, _curve(0.995), {"agreement": 0.995}, 2000)
BAD = LiveVersion(2, _curve(0.90), {"agreement": 0.90}, 2000)
SHADOW = {"mode": "shadow", "auto_cascade": True, "target_agreement": 0.98}


def test_a_good_version_earns_cascade_and_a_threshold():
    p = RoutePolicy(SHADOW)
    assert math.isinf(p.threshold)
    changes = p.on_version(GOOD)
    assert [c.event for c in changes] == ["mode.auto_cascade"] and changes[0].settings == {"mode": "cascade"}
    assert p.mode == "cascade" and p.threshold == 0.1
    assert p.decide(0.2).use_student and not p.decide(0.05).use_student


def test_a_version_short_of_the_target_gets_no_threshold_and_stays_in_shadow():
    p = RoutePolicy(SHADOW)
    assert p.on_version(BAD) == [] and p.mode == "shadow" and math.isinf(p.threshold)
    assert p.decide(0.99).reason == "mode_shadow"


def test_without_auto_cascade_a_good_version_only_gets_its_threshold():
    p = RoutePolicy({**SHADOW, "auto_cascade": False})
    assert p.on_version(GOOD) == [] and p.mode == "shadow" and p.threshold == 0.1


def test_a_direct_threshold_wins_and_a_target_change_rederives_it():
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98, "threshold": 0.7})
    p.on_version(GOOD)
    assert p.threshold == 0.7
    assert p.on_settings({"mode": "cascade", "target_agreement": 0.98}) == [] and p.threshold == 0.1
    p.on_settings({"mode": "cascade", "target_agreement": 0.999})
    assert math.isinf(p.threshold)  # the curve never reaches it: nothing is served


def test_checks_significantly_under_the_target_pause_the_route():
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98})
    p.on_version(GOOD)
    changes = []
    for i in range(40):
        changes += p.on_check(i % 4 != 0)  # 75% agreement
        if changes:
            break
    assert [c.event for c in changes] == ["drift.paused"]
    assert changes[0].settings == {"mode": "shadow", "paused_by_drift": True} and p.mode == "shadow"
    assert p.checks.n == 0 and changes[0].detail["version"] == 1 and changes[0].detail["checks"] >= 30


def test_a_few_misses_are_chance_not_drift():
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98})
    p.on_version(GOOD)
    assert all(p.on_check(i not in (3, 17)) == [] for i in range(30)) and p.mode == "cascade"


def test_checks_in_shadow_mode_never_pause():
    p = RoutePolicy({"mode": "shadow", "target_agreement": 0.98})
    p.on_version(BAD)
    assert all(p.on_check(False) == [] for _ in range(60))


def test_a_new_version_lifts_a_drift_pause_and_must_earn_cascade_again():
    p = RoutePolicy({**SHADOW, "mode": "cascade"})
    p.on_version(BAD)
    p.settings["mode"] = "cascade"
    while not p.on_check(False):
        pass
    assert p.paused_by_drift and p.mode == "shadow"
    changes = p.on_version(LiveVersion(3, GOOD.curve, GOOD.metrics, GOOD.val_pairs))
    assert [c.event for c in changes] == ["drift.cleared", "mode.auto_cascade"]
    assert changes[0].detail == {"version": 3, "paused_version": 2} and p.mode == "cascade"
    # a paused route whose new version is not good enough is unpaused but stays in shadow
    p2 = RoutePolicy({**SHADOW, "paused_by_drift": True})
    p2.live = GOOD
    assert [c.event for c in p2.on_version(BAD)] == ["drift.cleared"] and p2.mode == "shadow"


def test_the_same_version_reloaded_does_not_lift_a_pause():
    p = RoutePolicy({**SHADOW, "paused_by_drift": True})
    p.live = GOOD
    assert p.on_version(GOOD) == [] and p.paused_by_drift


def test_an_operator_lifting_a_pause_starts_a_fresh_window():
    p = RoutePolicy({"mode": "shadow", "paused_by_drift": True, "target_agreement": 0.98})
    p.on_version(GOOD)
    for _ in range(10):
        p.on_check(False)
    assert p.checks.n == 10
    assert p.on_settings({"mode": "cascade", "paused_by_drift": False, "target_agreement": 0.98}) == []
    assert p.checks.n == 0 and p.mode == "cascade"


def test_decide_in_each_mode():
    p = RoutePolicy({"mode": "off"})
    assert p.decide(1.0).reason == "mode_off"
    p = RoutePolicy({"mode": "cascade", "threshold": 0.5})
    assert p.decide(0.5).reason == "confident" and p.decide(0.49).reason == "below_threshold"
    assert p.decide(0.1, forbid_escalation=True).use_student


def test_describe_shows_threshold_checks_and_expectation():
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98})
    assert p.describe() == {"threshold_effective": None, "live_agreement": None, "live_checks": 0,
                            "threshold_source": "none"}
    p.on_version(GOOD)
    p.on_check(True)
    d = p.describe()
    assert d["threshold_effective"] == 0.1 and d["live_checks"] == 1 and d["expected"]["coverage"] == 1.0


YOUNG = LiveVersion(4, _curve(1.0, pairs=40), {"agreement": 1.0}, 40)  # too few validation pairs for 98%


def test_a_young_version_earns_cascade_from_live_labelled_answers():
    """40 validation pairs certify nothing at 98%; the side answers shadow mode scores do, and the
    route moves to cascade at the threshold they certify, as soon as they certify it."""
    p = RoutePolicy(SHADOW)
    assert p.on_version(YOUNG) == [] and p.mode == "shadow" and math.isinf(p.threshold)
    changes, labelled = [], 0
    while not changes and labelled < 2000:
        changes = p.on_labelled(0.95, True)
        labelled += 1
    assert [c.event for c in changes] == ["mode.auto_cascade"] and changes[0].detail["by"] == "live evidence"
    assert 200 < labelled < 1000 and p.mode == "cascade" and p.threshold_source == "live"
    assert p.decide(0.95).use_student and not p.decide(0.05).use_student
    assert p.describe()["certification"]["labelled"] == labelled


def test_labelled_answers_that_disagree_certify_nothing():
    p = RoutePolicy(SHADOW)
    p.on_version(YOUNG)
    assert all(p.on_labelled(0.95, i % 10 != 0) == [] for i in range(3000))  # 90% against a 98% target
    assert p.mode == "shadow" and math.isinf(p.threshold)


def test_checks_under_the_target_revoke_the_threshold_and_only_new_evidence_restores_it():
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98, "shadow_rate": 0.05})
    p.on_version(GOOD)
    assert p.threshold == 0.1 and p.threshold_source == "validation"
    changes = []
    for i in range(400):
        changes += p.on_check(i % 5 != 0, confidence=0.95, probability=0.05)  # 80% agreement
        if any(c.event == "threshold.revoked" for c in changes):
            break
    # the window monitor pauses the route as well (it looks at the last checks only); the revocation
    # is about the version, whatever the mode, and stays
    assert {c.event for c in changes} <= {"threshold.revoked", "drift.paused"}
    revoked = [c for c in changes if c.event == "threshold.revoked"]
    assert revoked and revoked[0].settings == {} and revoked[0].detail["version"] == 1
    assert revoked[0].detail["why"] in ("below_target", "below_calibration") and revoked[0].detail["checks"] <= 400
    p.on_settings({"mode": "cascade", "target_agreement": 0.98, "shadow_rate": 0.05})  # an operator resumes it
    assert math.isinf(p.threshold) and not p.decide(0.99).use_student  # the validation curve no longer counts
    # every request now escalates, and every escalation is labelled: answers right above 0.5 and
    # wrong under it certify the candidate at 0.5 again, not the one at 0.1
    for i in range(4000):
        confidence = (i % 100) / 100
        p.on_labelled(confidence, confidence >= 0.5)
        if not math.isinf(p.threshold):
            break
    assert p.threshold_source == "live" and p.decide(0.97).use_student and not p.decide(0.45).use_student
    # a new version starts its own evidence, and its validation counts again
    p.on_version(LiveVersion(5, GOOD.curve, GOOD.metrics, GOOD.val_pairs))
    assert p.threshold == 0.1 and p.evidence.revoked is None and p.evidence.labelled == 0


def test_a_version_whose_checks_fall_under_its_calibration_loses_its_threshold():
    """Served answers agree at 98.5%, over a 98% target, but the calibrator promised 99.99%: the
    calibration test revokes the threshold; the window monitor, which compares with the target, sees nothing."""
    import random

    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98, "shadow_rate": 0.05})
    p.on_version(GOOD)
    rng = random.Random(0)
    changes = []
    for _ in range(20000):
        changes += p.on_check(rng.random() < 0.985, confidence=0.9999, probability=0.05)
        if changes:
            break
    assert [c.event for c in changes] == ["threshold.revoked"] and changes[0].detail["why"] == "below_calibration"
    assert p.mode == "cascade" and not p.paused_by_drift


def test_checks_are_sampled_by_confidence_at_the_routes_rate():
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98, "shadow_rate": 0.02})
    p.on_version(GOOD)
    assert p.check_probability(0.9) == 0.02  # no served answers yet: the flat rate
    for _ in range(50):
        p.on_served(0.99)
    assert p.check_probability(0.5) > 0.02 > p.check_probability(0.9999)
    flat = RoutePolicy({"mode": "cascade", "target_agreement": 0.98, "shadow_rate": 0.02, "check_by_confidence": False})
    flat.on_version(GOOD)
    for _ in range(50):
        flat.on_served(0.99)
    assert flat.check_probability(0.5) == 0.02 == flat.check_probability(0.9999)
