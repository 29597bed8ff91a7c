"""The certification statistics (router/certify.py): error rates over many simulated streams,
including under continuous monitoring, and the unbiasedness of the weighted live estimate."""

from __future__ import annotations

import math
import random

import numpy as np

from router.certify import (
    BettingTest,
    VersionEvidence,
    anytime_lower,
    anytime_upper,
    candidate_thresholds,
    certified,
    check_probability,
    check_score,
    ipw_agreement,
)
from router.policy import wilson_lower


def test_the_bound_is_tight_where_routes_aim_and_matches_its_one_evaluation_form():
    # no error in 400 answers certifies 98% at alpha 0.05 / 12; 330 do not
    assert anytime_lower(400, 400, 0.05 / 12) >= 0.98 > anytime_lower(300, 300, 0.05 / 12)
    assert anytime_upper(0, 0, 0.05) == 1.0 and anytime_lower(0, 0, 0.05) == 0.0
    for k, n in ((400, 400), (395, 400), (990, 1000), (30, 30)):
        assert certified(k, n, 0.98, 0.01) == (anytime_lower(k, n, 0.01) >= 0.98)
    assert anytime_lower(990, 1000, 0.05) < 0.99 < anytime_upper(990, 1000, 0.05)


def test_the_bound_holds_under_continuous_monitoring_where_a_wilson_bound_does_not():
    """A route at exactly its target, looked at after every answer for 3,000 answers: the anytime
    bound ever claims the target in at most alpha of 300 streams; the fixed-sample 95% Wilson bound,
    looked at the same way, does far more often."""
    rng = np.random.default_rng(7)
    p, alpha, streams, n = 0.98, 0.05, 300, 3000
    anytime_wrong = wilson_wrong = 0
    looks = np.arange(20, n + 1, 5)
    for _ in range(streams):
        k = np.cumsum(rng.random(n) < p)
        if any(certified(float(k[t - 1]), float(t), p, alpha) for t in looks):
            anytime_wrong += 1
        if any(wilson_lower(k[t - 1] / t, t) >= p for t in looks):
            wilson_wrong += 1
    assert anytime_wrong / streams <= alpha
    assert wilson_wrong / streams > 2 * alpha


def test_the_betting_test_keeps_its_level_under_the_null_and_finds_an_excess():
    rng = np.random.default_rng(3)
    target, alpha, rate = 0.98, 0.01, 0.05

    def run(agreement: float, n: int = 1500) -> bool:
        test = BettingTest()
        for _ in range(n):
            conf = rng.uniform(0.9, 1.0)
            prob = check_probability(conf, rate=rate, scale=check_score(0.95))
            w = min(1.0, (1.0 / prob) / (5.0 / rate))
            err = 0.0 if rng.random() < agreement else 1.0
            test.update(w * (err - (1 - target)))
            if test.rejected(alpha):
                return True
        return False

    false_alarms = sum(run(0.98) for _ in range(200))
    assert false_alarms / 200 <= alpha + 0.02  # at the boundary of the null (Monte Carlo slack)
    assert sum(run(0.90) for _ in range(20)) >= 19  # a student at 90% is found within 1,500 checks


def test_weighted_checks_estimate_served_agreement_without_bias():
    """Checks sampled more often near the threshold (where agreement is lowest): the plain mean of the
    checks understates the served agreement, the inverse-probability-weighted one does not."""
    rng = np.random.default_rng(11)
    rate = 0.05
    estimates, plain, truth = [], [], []
    for _ in range(400):
        conf = rng.uniform(0.85, 1.0, 4000)
        agree = rng.random(4000) < conf  # calibrated: agreement = confidence
        scale = float(np.mean([check_score(c) for c in conf]))
        prob = np.array([check_probability(c, rate=rate, scale=scale) for c in conf])
        picked = rng.random(4000) < prob
        estimates.append(ipw_agreement(agree[picked].tolist(), prob[picked].tolist(), served=4000))
        plain.append(agree[picked].mean())
        truth.append(agree.mean())
    bias = np.mean(estimates) - np.mean(truth)
    assert abs(bias) < 0.002
    assert np.mean(plain) < np.mean(truth) - 0.004
    # the average check rate stays the route's shadow_rate
    conf = rng.uniform(0.85, 1.0, 20000)
    scale = float(np.mean([check_score(c) for c in conf]))
    assert abs(np.mean([check_probability(c, rate=rate, scale=scale) for c in conf]) - rate) < 0.005


def test_check_probability_is_higher_near_the_threshold_and_bounded():
    scale = check_score(0.95)
    near, far = check_probability(0.9, rate=0.02, scale=scale), check_probability(0.9999, rate=0.02, scale=scale)
    assert near > 0.02 > far >= 0.02 / 5
    assert check_probability(0.0, rate=0.5, scale=0.01) == 1.0
    assert check_probability(0.9, rate=0.02, scale=None) == 0.02 and check_probability(0.9, rate=0.0, scale=1) == 0.0


def _curve(agreement: float, pairs: int) -> list[dict[str, float]]:
    return [{"threshold": 1 - c / 2, "coverage": c, "agreement": agreement, "pairs": pairs * c}
            for c in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]


def test_candidates_come_from_the_curve_highest_first():
    cands = candidate_thresholds(_curve(0.99, 100))
    assert cands == sorted(cands, reverse=True) and len(cands) == 10 and cands[-1] == 0.5


def test_a_version_gains_a_threshold_as_labelled_answers_arrive_and_loses_it_to_bad_checks():
    ev = VersionEvidence.for_curve(_curve(0.995, 50), 0.98)
    assert math.isinf(ev.threshold())  # 50 validation pairs certify nothing at 98%
    rng = random.Random(0)
    for _ in range(3000):  # shadow mode: every answer labelled, the student right 99.8% of the time
        ev.add_labelled(rng.uniform(0.5, 1.0), rng.random() < 0.998)
        if not math.isinf(ev.threshold()):
            break
    assert ev.threshold() <= 0.75 and ev.labelled < 3000
    why = None
    for _ in range(400):  # then its served answers are checked and agree only 85%
        why = why or ev.add_check(0.99, rng.random() < 0.85, 0.05, rate=0.05)
    assert why in ("below_target", "below_calibration") and ev.revoked == why
    assert math.isinf(ev.threshold())  # only what is labelled from now on can certify it again


def test_a_change_after_a_long_good_history_is_found_within_a_few_dozen_checks():
    """The bets follow the recent checks, not the whole history: 500 good checks, then a third of
    the answers wrong at the same confidence, and the version's certification is revoked within 60
    checks of the change in most streams; with no change, in none of them."""
    found, false = [], 0
    for seed in range(20):
        rng = random.Random(seed)
        ev = VersionEvidence.for_curve(_curve(0.995, 2000), 0.85)
        for _ in range(500):
            assert ev.add_check(0.95, rng.random() < 0.999, 0.2, rate=0.2) is None
        after = next((i for i in range(400) if ev.add_check(0.95, rng.random() > 1 / 3, 0.2, rate=0.2)), None)
        found.append(after)
        steady = VersionEvidence.for_curve(_curve(0.995, 2000), 0.85)
        false += any(steady.add_check(0.95, rng.random() < 0.96, 0.2, rate=0.2) for _ in range(900))
    assert all(f is not None for f in found) and sorted(found)[len(found) // 2] <= 50 and sum(f <= 60 for f in found) >= 16
    assert false == 0  # 96% agreement at a calibrated 95%: over the target and over the calibration
