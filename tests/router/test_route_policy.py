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
    assert p.describe() == {"threshold_effective": None, "live_agreement": None, "live_checks": 0}
    p.on_version(GOOD)
    p.on_check(True)
    d = p.describe()
    assert d["threshold_effective"] == 0.1 and d["live_checks"] == 1 and d["expected"]["coverage"] == 1.0
