"""Calibrators, ECE and the coverage/agreement curve."""

from __future__ import annotations

import numpy as np
import pytest

from router.calibration import calibrator_from_dict, expected_calibration_error, fit_calibrator
from router.curve import coverage_at, coverage_curve, effective_size, threshold_for_target


def _overconfident(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true_p = rng.uniform(0.3, 1.0, n)
    correct = (rng.uniform(size=n) < true_p).astype(float)
    scores = np.sqrt(true_p)  # claims more than it delivers
    return scores, correct


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibration_reduces_ece_and_round_trips(method: str) -> None:
    scores, correct = _overconfident(4000)
    test_scores, test_correct = _overconfident(4000, seed=1)
    cal = fit_calibrator(scores, correct, method=method)
    before = expected_calibration_error(test_scores, test_correct)
    after = expected_calibration_error(cal(test_scores), test_correct)
    # Platt is a parametric curve, so it fits this non-logistic distortion less closely
    assert after < before / 2 and after < (0.03 if method == "isotonic" else 0.05)
    again = calibrator_from_dict(cal.to_dict())
    np.testing.assert_allclose(again(test_scores), cal(test_scores))
    # monotone: a higher score never gets a lower confidence
    grid = np.linspace(0, 1, 101)
    assert np.all(np.diff(again(grid)) >= -1e-12)


def test_isotonic_breaks_ties_without_moving_values() -> None:
    scores, correct = _overconfident(1000)
    cal = fit_calibrator(scores, correct, method="isotonic")
    out = cal(np.array([0.90, 0.9001]))
    assert out[1] > out[0] and out[1] - out[0] < 1e-3


def test_auto_uses_platt_on_small_sets_and_identity_on_nothing() -> None:
    assert fit_calibrator([0.9, 0.8, 0.6], [1, 1, 0]).method == "platt"
    assert fit_calibrator([], []).method == "identity"
    assert fit_calibrator(*_overconfident(500)).method == "isotonic"


def test_curve_and_threshold_for_target() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=float)
    curve = coverage_curve(conf, correct)
    assert curve[0] == {"threshold": 0.99, "coverage": 0.1, "agreement": 1.0, "pairs": 1.0}
    assert threshold_for_target(curve, 1.0) == 0.7  # the 5 most confident are all right
    assert coverage_at(curve, 1.0) == 0.5
    assert threshold_for_target(curve, 0.85) == 0.5  # 6 of 7 right
    assert coverage_at(curve, 0.0) == 1.0
    assert threshold_for_target(coverage_curve([0.5, 0.4], [0.0, 0.0]), 0.98) is None
    # equal confidences are served together or not at all
    tied = coverage_curve([0.9, 0.9, 0.9], [1.0, 0.0, 1.0])
    assert len(tied) == 1 and tied[0]["coverage"] == 1.0


def test_thinned_curve_keeps_the_answer_at_common_targets() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(size=5000)
    correct = (rng.uniform(size=5000) < conf).astype(float)
    full = coverage_curve(conf, correct, max_points=None)
    thin = coverage_curve(conf, correct, max_points=50)
    assert len(thin) <= 60
    for target in (0.95, 0.98, 0.99):
        assert threshold_for_target(thin, target) == threshold_for_target(full, target)


def test_weighted_curve_stands_for_the_traffic_a_skewed_sample_came_from() -> None:
    # Traffic: 100 confident requests (calibrated confidence 0.99) and 10 hard ones, half right. The
    # logged sample has every hard one (escalations) but only 10 of the confident ones (a 10%
    # shadow-check rate), all of which agreed.
    conf = np.r_[np.full(10, 0.99), np.linspace(0.5, 0.4, 10)]
    correct = np.r_[np.ones(10), np.tile([0.0, 1.0], 5)]
    plain = coverage_curve(conf, correct, max_points=None)
    assert threshold_for_target(plain, 0.98) == 0.99 and coverage_at(plain, 0.98) == 0.5  # as if half were hard
    weights = np.r_[np.full(10, 10.0), np.ones(10)]
    weighted = coverage_curve(conf, correct, max_points=None, weights=weights)
    # each check counts its own outcome once and the 9 requests it stands for at its confidence
    assert weighted[0] == pytest.approx({"threshold": 0.99, "coverage": 100 / 110, "agreement": (10 + 90 * 0.99) / 100, "pairs": 10})
    # two hard requests more (one wrong) still agree (99.1 + 1) / 102 >= 98% on the traffic
    assert coverage_at(weighted, 0.98) == pytest.approx(102 / 110)
    assert weighted[-1]["pairs"] == 20 and weighted[-1]["coverage"] == 1.0
    assert effective_size(weights, 20) == pytest.approx(110**2 / 1010)
    assert effective_size(None, 20) == 20
    # the confidence bound counts the pairs behind each point, not the requests they stand for
    from router.policy import conservative_curve

    bounded = conservative_curve(weighted, None)
    assert bounded[0]["agreement"] < 0.8  # 10 pairs are little evidence, whatever they stand for
