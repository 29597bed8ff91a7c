"""Anytime-valid certification of a route's agreement: the statistics, pure (no I/O, no numpy).

The router looks at its evidence after every labelled answer, so a bound that holds at one fixed
sample size (a Wilson interval) would be wrong far more often than its level says: checked again
and again, a 95% bound dips under the truth sooner or later. Everything here holds *uniformly over
time*: the chance that it is ever wrong, however often it is looked at, is at most ``alpha``
(Ville's inequality on a nonnegative (super)martingale).

- :func:`anytime_lower` / :func:`anytime_upper`: a confidence sequence for an agreement rate from
  ``k`` agreeing answers out of ``n`` (Robbins' beta-binomial mixture martingale). Used to *gain* a
  threshold: a version serves at confidence ``t`` once the labelled answers at ``t`` or above show
  the target with this bound.
- :class:`BettingTest`: a test by betting (a nonnegative supermartingale under the null, Waudby-Smith
  and Ramdas) of "the mean of Y is at most 0" for Y in [-1, 1]. Used to *lose* a threshold: the
  inverse-probability-weighted errors of checked answers exceed what the target allows, or what the
  version's own calibration promised.
- :func:`check_probability`: shadow checks sampled by confidence (more near the threshold, where the
  student errs, fewer far above it) at the same average rate; every check carries its probability,
  and :func:`ipw_agreement` weighs each by its inverse, so the live agreement stays unbiased.

Assumptions, stated once (docs/architecture.md repeats them):

1. Exchangeability: while one version serves under one threshold, requests arrive as draws from one
   traffic distribution (its mix drifts slower than versions change); each labelled answer is the
   teacher's verdict on one such request. A teacher that changes its mind violates it, which is what
   the tests are there to catch.
2. A check's probability is fixed before its answer is known (a function of the student's
   confidence and of the threshold in force), so the weighted estimate is unbiased and the betting
   test's increments have the sign of the served error's excess.
3. For the *gain* bound, labelled answers of different confidences are pooled unweighted: shadow-mode
   side answers and escalations (every one labelled) and checks (sampled, most often near the
   threshold). This needs agreement not to fall as calibrated confidence rises (the calibrator is
   isotonic): the pool then over-represents the least-agreeing part of the served set and understates
   its agreement, never overstates it.
4. Several thresholds are tested at once: each at ``alpha / candidates`` (Bonferroni), so every one
   of them is valid at the same time and the router may take whichever passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "anytime_lower",
    "anytime_upper",
    "mixture_log_e",
    "BettingTest",
    "check_probability",
    "ipw_agreement",
    "PRIOR",
    "certified",
    "check_score",
]

# The mixing distribution of the beta-binomial martingale, Beta(a, b): mean 0.99, the weight of 100
# answers. Any prior fixed in advance gives a valid sequence; one near the agreements routes aim at
# makes it tight there. Measured (tests/router/test_certify.py prints nothing; numbers from
# anytime_lower): at alpha 0.05 / 12, certifying 98% takes ~330 answers without an error and ~730 at
# 99.5%, against 139 and 222 for the one-shot 95% Wilson bound, which is not valid when monitored.
PRIOR = (99.0, 1.0)


def _betaln(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def mixture_log_e(k: float, n: float, p0: float, prior: tuple[float, float] = PRIOR) -> float:
    """log of the mixture likelihood ratio of ``k`` agreements in ``n`` against the rate ``p0``: an
    e-value (a martingale in ``n`` when the true rate is ``p0``)."""
    a, b = prior
    p0 = min(max(p0, 1e-12), 1 - 1e-12)
    return _betaln(a + k, b + n - k) - _betaln(a, b) - (k * math.log(p0) + (n - k) * math.log1p(-p0))


def anytime_lower(k: float, n: float, alpha: float, prior: tuple[float, float] = PRIOR) -> float:
    """A lower confidence bound on an agreement rate after ``k`` of ``n`` answers agreed, valid at
    every ``n`` at once: P(ever above the true rate) <= ``alpha``.

    Every rate p0 under the observed one whose mixture e-value reaches ``1/alpha`` is excluded; the
    bound is the largest excluded rate (found by bisection; the e-value falls as p0 nears k/n).
    ``k`` and ``n`` may be fractional (weighted validation points)."""
    if n <= 0:
        return 0.0
    k = min(max(k, 0.0), n)
    phat = k / n
    level = math.log(1.0 / alpha)
    if mixture_log_e(k, n, 1e-9, prior) < level:
        return 0.0
    lo, hi = 1e-9, phat
    for _ in range(50):
        mid = (lo + hi) / 2
        if mixture_log_e(k, n, mid, prior) >= level:
            lo = mid
        else:
            hi = mid
    return lo


def certified(k: float, n: float, target: float, alpha: float, prior: tuple[float, float] = PRIOR) -> bool:
    """``anytime_lower(k, n, alpha) >= target``, with one evaluation: the mixture e-value is convex in
    the rate with its minimum at k/n, so the excluded rates below k/n form one interval."""
    if n <= 0 or k / n <= target:
        return False
    return mixture_log_e(k, n, target, prior) >= math.log(1.0 / alpha)


def anytime_upper(k: float, n: float, alpha: float, prior: tuple[float, float] = PRIOR) -> float:
    """The matching upper bound (the lower bound of the disagreement rate, mirrored)."""
    if n <= 0:
        return 1.0
    return 1.0 - anytime_lower(n - k, n, alpha, (prior[1], prior[0]))


MEMORIES = (10.0, 40.0, 160.0)  # the bettors' memories, in observations (see BettingTest)


@dataclass
class BettingTest:
    """A sequential test of H0: E[Y] <= 0 for observations Y in [-lower, 1], by betting.

    One bettor's wealth ``prod(1 + lambda_i * Y_i)`` is a nonnegative supermartingale under H0
    whenever each bet ``lambda_i`` is in [0, 1/lower) and chosen before Y_i is seen; so it reaches
    ``1/alpha`` with probability at most ``alpha``, however long it runs (Ville). The test holds one
    bettor per memory in ``memories`` and rejects on the *average* of their wealths, itself such a
    supermartingale. Each bettor follows aGRAPA (the growth-optimal bet for the mean and variance of
    its last ``memory`` observations, exponentially discounted, shrunk to a small prior bet): over a
    long good history every bet sinks to zero, and after a change the short memories turn within a
    few observations, where a cumulative mean would hold the bet at zero for as long as the good
    history lasted (a student that degrades mid-stream is found within a few dozen checks of the
    change, not of its history); the long memories keep the power for a small, steady excess.
    """

    lower: float = 1.0  # how negative an observation can be (|min Y|): bets stay below half its inverse
    prior_n: float = 1.0  # the prior bet's weight, in observations
    prior_mean: float = 0.02
    memories: tuple[float, ...] = MEMORIES

    def __post_init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self._log_wealth = [0.0] * len(self.memories)
        self._recent = [[0.0, 0.0, 0.0] for _ in self.memories]  # discounted count, sum, sum of squares

    @property
    def log_wealth(self) -> float:
        """log of the average wealth of the bettors."""
        top = max(self._log_wealth)
        return top + math.log(sum(math.exp(w - top) for w in self._log_wealth) / len(self._log_wealth))

    def _bet(self, recent: list[float], bound: float) -> float:
        count, total, total_sq = recent
        mean = (total + self.prior_n * self.prior_mean) / (count + self.prior_n)
        second = (total_sq + self.prior_n * self.prior_mean) / (count + self.prior_n)
        var = max(second - mean * mean, 1e-6)
        return min(max(mean / (var + mean * mean), 0.0), 0.5 / max(bound, 1e-6))

    def update(self, y: float, *, lower: float | None = None) -> None:
        """One observation. ``lower`` (default: the test's own) bounds how negative this one could
        have been; it may depend on what was known before its outcome (its confidence), never on it."""
        bound = lower if lower is not None else self.lower
        y = min(max(float(y), -bound), 1.0)
        for i, memory in enumerate(self.memories):
            recent = self._recent[i]
            self._log_wealth[i] += math.log1p(self._bet(recent, bound) * y)
            keep = 1.0 - 1.0 / max(memory, 1.0)
            recent[0] = keep * recent[0] + 1.0
            recent[1] = keep * recent[1] + y
            recent[2] = keep * recent[2] + y * y
        self.n += 1
        self.total += y

    def rejected(self, alpha: float) -> bool:
        """Whether the evidence against H0 has reached level ``alpha``."""
        return self.log_wealth >= math.log(1.0 / alpha)


def check_probability(confidence: float, *, rate: float, scale: float | None, spread: float = 5.0) -> float:
    """The probability of checking a served answer of this calibrated ``confidence``.

    Proportional to ``sqrt(1 - confidence)`` (the standard deviation of a nearly-always-right
    answer: the allocation that minimises the weighted estimate's variance), divided by ``scale``,
    the mean of that score over served answers, so the average stays ``rate``; kept within
    ``[rate / spread, rate * spread]`` so no answer goes unchecked and no weight explodes. Without a
    ``scale`` yet (a new version), every answer is checked at ``rate``.
    """
    if rate <= 0:
        return 0.0
    if not scale or scale <= 0:
        return min(1.0, rate)
    p = rate * _score(confidence) / scale
    return min(1.0, max(rate / spread, min(rate * spread, p)))


def _score(confidence: float) -> float:
    return math.sqrt(max(1.0 - float(confidence), 1e-4))


def check_score(confidence: float) -> float:
    """What :func:`check_probability` is proportional to (its ``scale`` is this score's mean)."""
    return _score(confidence)


def ipw_agreement(agree: list[bool] | list[int], probability: list[float], served: int | None = None) -> float | None:
    """Agreement of served answers from checks sampled with ``probability`` each.

    With ``served`` (how many answers were served meanwhile), the Horvitz-Thompson estimate
    ``sum(agree / p) / served``: unbiased. Without it, the ratio form ``sum(agree / p) / sum(1 / p)``
    (Hájek), nearly unbiased and never outside [0, 1]. None without checks."""
    if not agree:
        return None
    num = sum(float(a) / p for a, p in zip(agree, probability))
    if served is not None:
        return num / served if served > 0 else None
    return num / sum(1.0 / p for p in probability)


def candidate_thresholds(curve: list[dict[str, float]], *, coverages: tuple[float, ...] | None = None) -> list[float]:
    """The thresholds a version may be certified at, highest first: the thresholds of its validation
    curve nearest to fixed coverage levels. Chosen from the curve alone, before any live evidence is
    seen, so the live tests are of hypotheses fixed in advance (and counted for the Bonferroni split)."""
    levels = coverages or CANDIDATE_COVERAGES
    pts = sorted((p for p in curve if p.get("coverage", 0) > 0), key=lambda p: p["coverage"])
    out: list[float] = []
    for level in levels:
        best = None
        for p in pts:
            if p["coverage"] <= level + 1e-9:
                best = p
        if best is not None and float(best["threshold"]) not in out:
            out.append(float(best["threshold"]))
    return sorted(set(out), reverse=True)


# coverage levels of the candidate thresholds: finer where a good version's threshold lands
CANDIDATE_COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass
class VersionEvidence:
    """The live evidence about one student version, and what it certifies.

    Gaining a threshold: every labelled answer (a shadow-mode side answer, an escalation the teacher
    answered, a check) counts at each candidate threshold it clears; the version's validation point
    at that threshold is the first batch. A candidate is certified when the pooled answers show the
    target with :func:`certified` at ``alpha / len(candidates)``; the threshold is the lowest such.

    Losing it: each check also feeds two betting tests on its inverse-probability-weighted error:
    against the target (served agreement under it) and against the version's calibration (agreement
    under what its calibrated confidences promised, by more than ``calibration_slack``). Either one
    rejecting at ``revoke_alpha`` (so at most twice that for a version that meets both), once the
    version has ``min_checks`` checks, revokes its certification: the validation evidence, which the
    checks contradict, no longer counts, and only answers labelled from then on can certify it again.
    """

    candidates: list[float]
    target: float
    alpha: float = 0.05
    revoke_alpha: float = 0.01
    calibration_slack: float = 0.01
    min_checks: int = 30
    val_n: list[float] = None  # type: ignore[assignment]
    val_k: list[float] = None  # type: ignore[assignment]
    revoked: str | None = None  # why ("below_target", "below_calibration"), once revoked

    def __post_init__(self) -> None:
        g = len(self.candidates)
        self.val_n = list(self.val_n or [0.0] * g)
        self.val_k = list(self.val_k or [0.0] * g)
        self.n = [0.0] * g
        self.k = [0.0] * g
        self.labelled = 0
        # H0 "the served answers agree at least at the target": an average over what is served, so
        # the bets may not depend on a check's confidence (its weight is at most 1)
        self.target_test = BettingTest(lower=1.0 - self.target)
        # H0 "at each confidence, agreement is at least the confidence less the slack": pointwise,
        # so each bet may use the check's own confidence
        self.calibration_test = BettingTest()
        self.checks_agree: list[int] = []
        self.checks_prob: list[float] = []
        self.checks_expected = 0.0  # sum of weighted calibrated confidences of checked answers
        self.served = 0
        self.score_sum = 0.0
        self._threshold: float | None = None

    @classmethod
    def for_curve(cls, curve: list[dict[str, float]], target: float, *, alpha: float = 0.05,
                  use_validation: bool = True) -> VersionEvidence:
        """Evidence for a version with this validation curve (its points give the first batch)."""
        from router.curve import point_at

        candidates = candidate_thresholds(curve)
        val_n, val_k = [], []
        for t in candidates:
            p = point_at(curve, t) if use_validation else None
            n = float(p.get("pairs", 0.0)) if p else 0.0
            val_n.append(n)
            val_k.append(n * float(p["agreement"]) if p else 0.0)
        return cls(candidates, target, alpha=alpha, val_n=val_n, val_k=val_k)

    # -- evidence ------------------------------------------------------------------------------
    def add_labelled(self, confidence: float, agree: bool) -> None:
        """An answer whose agreement with the teacher is known (shadow side answer, escalation, check)."""
        self.labelled += 1
        for i, t in enumerate(self.candidates):
            if confidence >= t:
                self.n[i] += 1.0
                self.k[i] += 1.0 if agree else 0.0
        self._threshold = None

    def add_served(self, confidence: float) -> None:
        """A served answer (checked or not): the check sampler's scale is the served mean score."""
        self.served += 1
        self.score_sum += check_score(confidence)

    @property
    def scale(self) -> float | None:
        return self.score_sum / self.served if self.served >= 20 else None

    def add_check(self, confidence: float, agree: bool, probability: float, *, rate: float, spread: float = 5.0) -> str | None:
        """A served answer checked with ``probability``; returns why certification was revoked now, if it was."""
        self.add_labelled(confidence, agree)
        p = max(probability, 1e-6)
        self.checks_agree.append(1 if agree else 0)
        self.checks_prob.append(p)
        self.checks_expected += confidence / p
        # weights scaled into [0, 1]: the largest a check can carry is 1 / (rate / spread)
        w = min(1.0, (1.0 / p) / (spread / max(rate, 1e-6)))
        err = 0.0 if agree else 1.0
        self.target_test.update(w * (err - (1.0 - self.target)))
        slack = (1.0 - confidence) + self.calibration_slack
        self.calibration_test.update(w * (err - slack), lower=max(w * slack, 1e-3))
        # as the window monitor does (router.policy.LiveAgreement), nothing is concluded from fewer
        # than min_checks checks: the wealth keeps what they showed, and the test decides at the 30th
        if self.revoked is None and len(self.checks_agree) >= self.min_checks:
            if self.target_test.rejected(self.revoke_alpha):
                return self._revoke("below_target")
            if self.calibration_test.rejected(self.revoke_alpha):
                return self._revoke("below_calibration")
        return None

    def revoke(self, why: str) -> str:
        """Drop what the evidence held (the validation points and every answer so far): from now on
        only answers labelled later can certify this version. ``why`` is kept in ``revoked``."""
        return self._revoke(why)

    def _revoke(self, why: str) -> str:
        self.revoked = why
        g = len(self.candidates)
        self.val_n, self.val_k = [0.0] * g, [0.0] * g
        self.n, self.k = [0.0] * g, [0.0] * g
        self._threshold = None
        return why

    # -- what it certifies ----------------------------------------------------------------------
    def threshold(self) -> float:
        """The lowest candidate the evidence certifies at the target (``inf``: none)."""
        if self._threshold is None:
            level = self.alpha / max(1, len(self.candidates))
            best = math.inf
            for i, t in enumerate(self.candidates):
                if certified(self.k[i] + self.val_k[i], self.n[i] + self.val_n[i], self.target, level):
                    best = min(best, t)
            self._threshold = best
        return self._threshold

    @property
    def live_agreement(self) -> float | None:
        """The weighted (unbiased) agreement of served answers from the checks."""
        return ipw_agreement(self.checks_agree, self.checks_prob)

    @property
    def expected_agreement(self) -> float | None:
        """What the version's calibration promised for the same checked answers (same weights)."""
        if not self.checks_prob:
            return None
        return self.checks_expected / sum(1.0 / p for p in self.checks_prob)
