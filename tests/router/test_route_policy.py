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
        if changes:
            break
    # the betting tests revoke the version's threshold, or the window monitor (which looks at the last
    # checks only) pauses the route first, which drops the version's evidence the same way; either
    # is about the version, whatever the mode, and stays
    assert {c.event for c in changes} <= {"threshold.revoked", "drift.paused"}
    revoked = [c for c in changes if c.event == "threshold.revoked"]
    assert all(c.settings == {} and c.detail["version"] == 1 for c in revoked)
    assert p.evidence.revoked in ("below_target", "below_calibration", "drift") and len(p.evidence.checks_agree) <= 400
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


def test_the_drift_window_weighs_checks_by_their_sampling_probability():
    """Checks are drawn more where the student is least sure, and that is where it errs: the plain share
    of agreeing checks is biased low. Weighted by 1 / probability the window reads what is served."""
    p = RoutePolicy({"mode": "cascade", "target_agreement": 0.98, "shadow_rate": 0.02})
    p.on_version(GOOD)
    changes = []
    for i in range(60):
        # every fourth check is a low-confidence answer checked 5x as often, a third of them wrong
        low = i % 4 == 0
        changes += p.on_check(not (low and i % 12 == 0), confidence=0.5 if low else 0.99,
                              probability=0.1 if low else 0.02)
    # plain: 55 of 60 agree (91.7%, a pause); weighted: each low check stands for 1/5 of a high one
    assert 0.97 < p.checks.agreement < 0.99 and p.checks.effective_n < p.checks.n
    assert not any(c.event == "drift.paused" for c in changes) and p.mode == "cascade"


def _paused() -> RoutePolicy:
    p = RoutePolicy({**SHADOW, "mode": "cascade"})
    p.on_version(GOOD)
    changes = []
    while not any(c.event == "drift.paused" for c in changes):
        changes += p.on_check(False, confidence=0.95, probability=0.02)
    assert p.paused_by_drift and p.mode == "shadow" and p.evidence.revoked == "drift"
    assert math.isinf(p.threshold)  # neither the validation curve nor the old evidence counts now
    return p


def test_a_drift_pause_heals_on_evidence_labelled_since_and_holds_on_a_changed_teacher():
    # a teacher that changed its answers: the side answers keep disagreeing, the route stays in shadow
    p = _paused()
    assert all(p.on_labelled(0.95, i % 10 != 0) == [] for i in range(3000)) and p.paused_by_drift
    # the alarm was chance: the answers labelled since agree, and they alone take the route back
    p = _paused()
    healed = []
    for _ in range(2000):
        healed += p.on_labelled(0.95, True)
        if healed:
            break
    assert [c.event for c in healed] == ["drift.cleared"]
    assert healed[0].settings == {"mode": "cascade", "paused_by_drift": False}
    assert healed[0].detail["by"] == "live evidence since the drift pause"
    assert p.mode == "cascade" and not p.paused_by_drift and not math.isinf(p.threshold)


def test_a_pause_from_another_replica_drops_the_evidence_too():
    p = RoutePolicy({**SHADOW, "mode": "cascade"})
    p.on_version(GOOD)
    assert not math.isinf(p.threshold)
    assert p.on_settings({**SHADOW, "mode": "shadow", "paused_by_drift": True}) == []
    assert p.evidence.revoked == "drift" and math.isinf(p.threshold)
