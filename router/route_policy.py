"""One route's routing policy as pure logic: events in, decisions and mode changes out.

The gateway feeds a :class:`RoutePolicy` everything that happens to its route and does what it
returns; no I/O happens here, so every transition is a unit test (``tests/router/test_route_policy.py``).

Events
    :meth:`RoutePolicy.on_version`   a student version went live (hot-loaded)
    :meth:`RoutePolicy.on_settings`  the route's settings changed (admin, CLI, config, another replica)
    :meth:`RoutePolicy.on_check`     a served student answer was checked against the teacher
    :meth:`RoutePolicy.on_labelled`  an unserved student answer was scored against the teacher's
                                     (a shadow-mode side answer, or an escalation)
    :meth:`RoutePolicy.on_served`    a student answer was served (the check sampler's scale)
    :meth:`RoutePolicy.decide`       a cascade request's student answer, with its calibrated confidence

The threshold in force (:attr:`RoutePolicy.threshold`): the route's own, else the lower of two
certified ones: the live version's validation curve at the route's ``target_confidence``
(:func:`router.policy.effective_threshold`), and the live evidence (:class:`router.certify.VersionEvidence`:
every labelled answer of this version, anytime-valid). A version whose checks show it under its
target or its calibration (a betting test, weighted by each check's probability) loses the first
and keeps only what answers labelled after that certify; everything it does not serve is then
escalated, so every one of them is labelled and it re-earns a threshold as fast as the evidence allows.

Mode changes (:class:`ModeChange`), each persisted by the caller with its event:
    ``mode.auto_cascade``  shadow -> cascade: the live version meets the target on its validation
                           curve with the route's ``target_confidence``, or its live evidence
                           certifies a threshold, on a useful share of traffic
    ``drift.paused``       cascade -> shadow (``paused_by_drift``): the checks, weighted by the inverse
                           of their sampling probability, are significantly under the target
                           (:meth:`router.policy.LiveAgreement.drifted`); the version's evidence is
                           dropped, and only answers labelled since the pause can take it back
                           (``drift.cleared``)
    ``threshold.revoked``  (no settings) the live version's checks fall significantly under the target
                           or under its calibration: it serves only what later evidence certifies
    ``drift.cleared``      the pause is lifted because a new version went live (it must still earn
                           cascade), or, back to cascade at once, because the paused version's answers
                           labelled since the pause certify a threshold; an operator who sets
                           ``mode = cascade`` lifts it too
                           (:meth:`gateway.routing.RouteTable.update_settings`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from router.certify import VersionEvidence, check_probability
from router.policy import (
    DEFAULT_TARGET_CONFIDENCE,
    NEVER,
    Decision,
    LiveAgreement,
    decide,
    effective_threshold,
    expected_at,
    ready_for_cascade,
)

__all__ = ["RoutePolicy", "LiveVersion", "ModeChange", "MIN_CASCADE_COVERAGE"]

MIN_CASCADE_COVERAGE = 0.01  # a version that would serve less than this stays in shadow


@dataclass(frozen=True)
class LiveVersion:
    """What the policy needs of a live student version: its validation curve and evidence."""

    version: int
    curve: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    val_pairs: int | None = None


@dataclass(frozen=True)
class ModeChange:
    """Settings to persist for the route, and the event to record with them. ``expect`` is what
    the stored settings must still say for the change to apply: with several gateway replicas each
    deciding the same transition, the first to claim it records it and the others find it made."""

    settings: dict[str, Any]
    event: str
    detail: dict[str, Any]
    expect: dict[str, Any] = field(default_factory=dict)


class RoutePolicy:
    """The routing state of one route: its settings, its live version, the threshold in force and
    the window of recent checks. Not thread-safe by itself; the gateway calls it from its event loop."""

    def __init__(self, settings: dict[str, Any] | None = None, *, default_target: float = 0.98, window: int = 200):
        self.settings: dict[str, Any] = dict(settings or {})
        self.default_target = default_target
        self.live: LiveVersion | None = None
        self.checks = LiveAgreement(window)
        self.evidence: VersionEvidence | None = None
        self.threshold = NEVER
        self.threshold_source = "none"  # "setting" | "validation" | "live" | "none"
        self._derive()

    # -- state ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return str(self.settings.get("mode") or "shadow")

    @property
    def target(self) -> float:
        return float(self.settings.get("target_agreement") or self.default_target)

    @property
    def paused_by_drift(self) -> bool:
        return bool(self.settings.get("paused_by_drift"))

    @property
    def alpha(self) -> float:
        """The certification's error rate: 1 - the route's ``target_confidence``."""
        c = self.settings.get("target_confidence")
        return 1.0 - (DEFAULT_TARGET_CONFIDENCE if c is None else float(c))

    def _new_evidence(self) -> None:
        live = self.live
        self.evidence = (VersionEvidence.for_curve(live.curve, self.target, alpha=self.alpha)
                         if live is not None and live.curve else None)

    def _derive(self) -> None:
        live = self.live
        if self.settings.get("threshold") is not None:
            self.threshold, self.threshold_source = float(self.settings["threshold"]), "setting"
            return
        ev = self.evidence
        validated = NEVER
        if ev is None or ev.revoked is None:
            validated = effective_threshold(self.settings, live.curve if live else None, live.val_pairs if live else None)
        certified = ev.threshold() if ev is not None else NEVER
        self.threshold = min(validated, certified)
        self.threshold_source = ("none" if math.isinf(self.threshold)
                                 else "validation" if validated <= certified else "live")

    def _apply(self, change: ModeChange) -> ModeChange:
        self.settings.update(change.settings)
        self._derive()
        return change

    def _maybe_cascade(self) -> list[ModeChange]:
        live = self.live
        if live is None or self.mode != "shadow" or not self.settings.get("auto_cascade"):
            return []
        ev = self.evidence
        by_evidence = (ev is not None and not math.isinf(ev.threshold())
                       and expected_at(live.curve, ev.threshold())["coverage"] >= MIN_CASCADE_COVERAGE)
        if self.paused_by_drift:
            # The pause dropped this version's evidence (``_pause``): only answers labelled since
            # (every request is, in shadow mode) can put it back, so a chance alarm heals itself within
            # a few hundred requests, and a teacher that changed its answers keeps the route in shadow.
            if not (by_evidence and ev is not None and ev.revoked == "drift"):
                return []
            return [self._apply(ModeChange({"mode": "cascade", "paused_by_drift": False}, "drift.cleared",
                                           {"version": live.version, "paused_version": live.version, "target": self.target,
                                            "by": "live evidence since the drift pause", "labelled": ev.labelled},
                                           expect={"mode": "shadow", "paused_by_drift": True}))]
        if not by_evidence and (ev is not None and ev.revoked or not ready_for_cascade(
                live.metrics, live.curve, self.target, n_val=live.val_pairs,
                confidence=self.settings.get("target_confidence"))):
            return []
        return [self._apply(ModeChange({"mode": "cascade"}, "mode.auto_cascade",
                                       {"version": live.version, "target": self.target,
                                        "by": "live evidence" if by_evidence else "validation",
                                        "labelled": ev.labelled if ev is not None else 0}, expect={"mode": "shadow"}))]

    # -- events --------------------------------------------------------------------------------
    def on_version(self, live: LiveVersion) -> list[ModeChange]:
        """A version went live. Its checks start afresh; a drift pause about an earlier version is
        lifted (the new one still has to earn cascade on its own curve)."""
        previous = self.live
        self.live = live
        self.checks.reset()
        self._new_evidence()
        changes: list[ModeChange] = []
        if self.paused_by_drift and previous is not None and previous.version != live.version:
            changes.append(self._apply(ModeChange({"paused_by_drift": False}, "drift.cleared",
                                                  {"version": live.version, "paused_version": previous.version},
                                                  expect={"paused_by_drift": True})))
        self._derive()
        return changes + self._maybe_cascade()

    def on_settings(self, settings: dict[str, Any]) -> list[ModeChange]:
        """The route's settings are now ``settings`` (the whole effective set). When a pause was
        lifted (an operator put the route back in cascade), the checks start afresh."""
        was_paused = self.paused_by_drift
        before = (self.target, self.alpha)
        self.settings = dict(settings)
        if (self.target, self.alpha) != before:
            self._new_evidence()  # counted against another target: start afresh
        self._derive()
        if was_paused and not self.paused_by_drift:
            self.checks.reset()
        elif self.paused_by_drift and not was_paused:
            self._pause_evidence()  # paused by another replica or an operator: the same as here
        return self._maybe_cascade()

    def _pause_evidence(self) -> None:
        if self.evidence is not None and self.evidence.revoked != "drift":
            self.evidence.revoke("drift")
            self._derive()

    def check_probability(self, confidence: float) -> float:
        """How likely a served answer of this confidence is to be checked (the route's ``shadow_rate``
        on average; more near the threshold, fewer far above it: :func:`router.certify.check_probability`)."""
        rate = float(self.settings.get("shadow_rate") or 0.0)
        if not self.settings.get("check_by_confidence", True):
            return rate
        return check_probability(confidence, rate=rate, scale=self.evidence.scale if self.evidence else None)

    def on_served(self, confidence: float) -> None:
        """A student answer was served (checked or not)."""
        if self.evidence is not None:
            self.evidence.add_served(confidence)

    def on_labelled(self, confidence: float, agree: bool) -> list[ModeChange]:
        """An answer of the live version the student did not serve was scored against the teacher's
        (a shadow-mode side answer, an escalation): evidence for a lower threshold. A shadow route
        whose evidence now certifies a threshold moves to cascade."""
        if self.evidence is None:
            return []
        before = self.threshold
        self.evidence.add_labelled(confidence, agree)
        self._derive()
        if self.threshold != before and self.mode == "shadow":
            return self._maybe_cascade()
        return []

    def on_check(self, agree: bool, *, confidence: float | None = None, probability: float | None = None) -> list[ModeChange]:
        """A served (cascade) student answer was checked (sampled with ``probability``). The checks
        feed the version's evidence and its revocation tests; when the window of the last checks is
        significantly under the target the route goes back to shadow, paused, and the window starts
        afresh."""
        self.checks.add(agree, 1.0 / probability if probability else 1.0)
        changes: list[ModeChange] = []
        if self.evidence is not None and confidence is not None:
            rate = float(self.settings.get("shadow_rate") or 0.0) or (probability or 1.0)
            why = self.evidence.add_check(confidence, agree, probability or rate, rate=rate)
            self._derive()
            if why is not None:
                changes.append(ModeChange({}, "threshold.revoked", {
                    "version": self.live.version if self.live else None, "why": why, "target": self.target,
                    "live_agreement": self.evidence.live_agreement, "expected": self.evidence.expected_agreement,
                    "checks": len(self.evidence.checks_agree)}))
        if self.mode != "cascade" or not self.checks.drifted(self.target):
            return changes
        detail = {"live_agreement": self.checks.agreement, "checks": self.checks.n, "target": self.target,
                  "version": self.live.version if self.live else None}
        self.checks.reset()
        pause = self._apply(ModeChange({"mode": "shadow", "paused_by_drift": True}, "drift.paused", detail,
                                       expect={"mode": "cascade"}))
        self._pause_evidence()
        return changes + [pause]

    def decide(self, confidence: float, *, forbid_escalation: bool = False) -> Decision:
        """Whether a cascade request is answered by the student at this calibrated ``confidence``."""
        return decide(mode=self.mode, confidence=confidence, threshold=self.threshold, forbid_escalation=forbid_escalation)

    # -- view ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The threshold in force, the live checks and what the curve predicts at the threshold."""
        out: dict[str, Any] = {
            "threshold_effective": None if math.isinf(self.threshold) else self.threshold,
            "live_agreement": self.checks.agreement,
            "live_checks": self.checks.n,
            "threshold_source": self.threshold_source,
        }
        ev = self.evidence
        if ev is not None:
            out["certification"] = {
                "labelled": ev.labelled, "checks": len(ev.checks_agree), "served": ev.served,
                "weighted_agreement": ev.live_agreement, "calibrated_expectation": ev.expected_agreement,
                "certified_threshold": None if math.isinf(ev.threshold()) else ev.threshold(),
                "revoked": ev.revoked,
            }
        if self.live is not None and not math.isinf(self.threshold):
            out["expected"] = expected_at(self.live.curve, self.threshold)
        return out
