"""One route's routing policy as pure logic: events in, decisions and mode changes out.

The gateway feeds a :class:`RoutePolicy` everything that happens to its route and does what it
returns; no I/O happens here, so every transition is a unit test (``tests/router/test_route_policy.py``).

Events
    :meth:`RoutePolicy.on_version`   a student version went live (hot-loaded)
    :meth:`RoutePolicy.on_settings`  the route's settings changed (admin, CLI, config, another replica)
    :meth:`RoutePolicy.on_check`     a served student answer was checked against the teacher
    :meth:`RoutePolicy.decide`       a cascade request's student answer, with its calibrated confidence

Mode changes (:class:`ModeChange`), each persisted by the caller with its event:
    ``mode.auto_cascade``  shadow -> cascade: the live version meets the target on its validation
                           curve with the route's ``target_confidence``, on a useful share of traffic
    ``drift.paused``       cascade -> shadow (``paused_by_drift``): the checks are significantly
                           under the target (:meth:`router.policy.LiveAgreement.drifted`)
    ``drift.cleared``      the pause is lifted because a new version went live (it must still earn
                           cascade); an operator who sets ``mode = cascade`` lifts it too
                           (:meth:`gateway.routing.RouteTable.update_settings`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from router.policy import NEVER, Decision, LiveAgreement, decide, effective_threshold, expected_at, ready_for_cascade

__all__ = ["RoutePolicy", "LiveVersion", "ModeChange"]


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
        self.threshold = NEVER
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

    def _derive(self) -> None:
        live = self.live
        self.threshold = effective_threshold(self.settings, live.curve if live else None, live.val_pairs if live else None)

    def _apply(self, change: ModeChange) -> ModeChange:
        self.settings.update(change.settings)
        self._derive()
        return change

    def _maybe_cascade(self) -> list[ModeChange]:
        live = self.live
        if live is None or self.mode != "shadow" or not self.settings.get("auto_cascade") or self.paused_by_drift:
            return []
        if not ready_for_cascade(live.metrics, live.curve, self.target, n_val=live.val_pairs,
                                 confidence=self.settings.get("target_confidence")):
            return []
        return [self._apply(ModeChange({"mode": "cascade"}, "mode.auto_cascade",
                                       {"version": live.version, "target": self.target}, expect={"mode": "shadow"}))]

    # -- events --------------------------------------------------------------------------------
    def on_version(self, live: LiveVersion) -> list[ModeChange]:
        """A version went live. Its checks start afresh; a drift pause about an earlier version is
        lifted (the new one still has to earn cascade on its own curve)."""
        previous = self.live
        self.live = live
        self.checks.reset()
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
        self.settings = dict(settings)
        self._derive()
        if was_paused and not self.paused_by_drift:
            self.checks.reset()
        return self._maybe_cascade()

    def on_check(self, agree: bool) -> list[ModeChange]:
        """A served (cascade) student answer was checked. When the window is significantly under
        the target the route goes back to shadow, paused, and the window starts afresh."""
        self.checks.add(agree)
        if self.mode != "cascade" or not self.checks.drifted(self.target):
            return []
        detail = {"live_agreement": self.checks.agreement, "checks": self.checks.n, "target": self.target,
                  "version": self.live.version if self.live else None}
        self.checks.reset()
        return [self._apply(ModeChange({"mode": "shadow", "paused_by_drift": True}, "drift.paused", detail,
                                       expect={"mode": "cascade"}))]

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
        }
        if self.live is not None and not math.isinf(self.threshold):
            out["expected"] = expected_at(self.live.curve, self.threshold)
        return out
