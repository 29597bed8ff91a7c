"""The promotion gate's comparison, shared by every student kind: a candidate and the live version
scored on the same validation pairs, each at the threshold the router would serve it at.

:func:`distiller.pipeline.gate` (label students) and :func:`distiller.lm.registry.gate_lm`
(LM students, structured and free-text) each decide which pairs to compare on and score both versions there; the
arithmetic and the words of the decision are here, once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.curve import coverage_at, coverage_curve, point_at
from router.policy import effective_threshold, wilson_upper

__all__ = ["GateResult", "served_at_own_threshold", "live_scores", "score_live"]

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """The promotion gate's comparison of the candidate and the live version on the same validation
    pairs: the share of them each would serve at its own threshold for the route's target (derived
    from its own validation curve, as the router derives it), and the agreement of what it serves."""

    candidate: float  # weighted share of the pairs the candidate serves at its threshold
    live: float | None  # the same for the live version (None: there is none)
    pairs: int
    unseen_only: bool  # compared on the pairs the live version never trained on
    target: float = 0.98
    candidate_agreement: float = 1.0  # agreement of what the candidate serves there
    live_agreement: float | None = None
    candidate_served_pairs: int = 0  # the evidence behind candidate_agreement
    live_served_pairs: int = 0  # the evidence behind live_agreement
    candidate_raw: float = 0.0  # coverage at the target on the plain curve of these pairs: the
    live_raw: float | None = None  # tie-break while neither version is certified to serve anything
    # The share each version's own cross-fitted curve certifies (holdout split, both versions): an
    # estimate over all the route's labelled pairs, where the compared pairs in cascade mode are a few
    # hundred escalations and checks, a handful of checks deciding the weighted shares.
    candidate_certified: float | None = None
    live_certified: float | None = None
    live_version: int | None = None  # the version compared against
    live_scored: bool = False  # the live version was run on these pairs (False: it could not be loaded)

    def quality_ok(self) -> bool:
        """What the candidate serves here is not significantly below the target (a one-sided 95%
        test on the pairs it serves); its threshold came from its own, larger validation split."""
        if self.candidate_served_pairs == 0:
            return True
        return wilson_upper(self.candidate_agreement, self.candidate_served_pairs) >= self.target

    def live_quality_ok(self) -> bool:
        """The same test for the live version: one that serves these pairs significantly below the
        target is not serving what it should, and its share there counts for nothing."""
        if self.live_served_pairs == 0 or self.live_agreement is None:
            return True
        return wilson_upper(self.live_agreement, self.live_served_pairs) >= self.target

    def decided_by_certified(self) -> bool:
        """Both versions' own curves were cross-fitted on the holdout and one of them certifies a
        share: those shares decide (else the shares served on the compared pairs do)."""
        return (self.candidate_certified is not None and self.live_certified is not None
                and (self.candidate_certified > 0 or self.live_certified > 0))

    def candidate_wins(self) -> bool:
        if not self.quality_ok():
            return False
        if self.decided_by_certified():
            return self.candidate_certified > self.live_certified
        live = ((self.live or 0.0) if self.live_quality_ok() else 0.0, self.live_raw or 0.0)
        return (self.candidate, self.candidate_raw) > live

    def where(self) -> str:
        return f"{self.pairs} validation pairs" + (" the live version never saw" if self.unseen_only else "")

    def promotion_reason(self) -> str:
        """Why the candidate went live, in words (the registry's promotion reason)."""
        target = f"{self.target:.0%}"
        certified = (f"; its own curve certifies {self.candidate_certified:.1%} vs {self.live_certified:.1%}"
                     if self.candidate_certified is not None and self.live_certified is not None else "")
        plain = f"{self.candidate_raw:.1%} vs {self.live_raw or 0.0:.1%}"
        if self.candidate_served_pairs == 0 and not self.live:
            return (f"no version serves any of {self.where()} at its threshold for {target} agreement yet; the "
                    f"plain curves' coverage there decides: {plain}{certified}")
        live_part = ""
        if self.live_agreement is not None:
            live_part = (f" vs {self.live or 0.0:.1%} at {self.live_agreement:.1%}" if self.live_served_pairs
                         else f" vs {self.live or 0.0:.1%}")
        return (f"serves {self.candidate:.1%} of {self.where()} at its threshold for {target} agreement, with "
                f"{self.candidate_agreement:.1%} agreement there{live_part} (plain curves: {plain}){certified}"
                + ("; the live version's share counts for nothing: what it serves there agrees significantly below "
                   "the target" if not self.live_quality_ok() else ""))

    def kept_reason(self) -> str:
        """Why the candidate stays a candidate, in words."""
        target = f"{self.target:.0%}"
        if not self.quality_ok():
            return f"what it serves agrees only {self.candidate_agreement:.1%}, significantly below {target}"
        if self.decided_by_certified():
            return (f"its own curve certifies {self.candidate_certified:.1%}, not more than the live version's "
                    f"{self.live_certified:.1%}")
        return f"not more than the live version's {self.live or 0.0:.1%} on the same pairs"

    def kept_detail(self, version: int) -> dict[str, Any]:
        """The ``student.kept_candidate`` event's detail."""
        return {"version": version, "coverage": self.candidate, "live_coverage": self.live,
                "agreement": self.candidate_agreement, "live_agreement": self.live_agreement,
                "quality_ok": self.quality_ok(), "pairs": self.pairs, "unseen_only": self.unseen_only,
                "certified": self.candidate_certified, "live_certified": self.live_certified}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"candidate_wins": self.candidate_wins()}


def served_at_own_threshold(
    confidence: Sequence[float], correct: Sequence[float], own_curve: Sequence[dict[str, float]] | None, *,
    weights: Sequence[float] | None, target: float, target_confidence: float | None = None,
) -> tuple[float, float, int, float]:
    """One version on the compared pairs: the (weighted) share it serves at the threshold the router
    derives from its own validation curve (``own_curve``, bounded at the route's confidence), the
    agreement and number of the pairs served there, and the plain curve's coverage at ``target``."""
    curve = coverage_curve(confidence, correct, max_points=None, weights=weights)
    settings = {"target_agreement": target, "target_confidence": target_confidence}
    point = point_at(curve, effective_threshold(settings, own_curve))
    raw = coverage_at(curve, target)
    if point is None:
        return 0.0, 1.0, 0, raw
    return point["coverage"], point["agreement"], int(point["pairs"]), raw


def live_scores(row: dict[str, Any], pairs: Sequence[Any], *, batch_size: int = 8, progress: bool = False) -> tuple[Any, Any]:
    """The live version's (``row``, a registry row) confidence in, and agreement of, its answer to each
    pair (``.messages``, ``.answer``): 0 and a disagreement where it declines (it would escalate).
    Agreement by the artifact's own answer format. A structured LM version is decoded in batches by
    its own decoder; any other kind answers through its loader (:func:`router.student.answer_all`).
    Raises whatever loading or running it raises: the callers count a broken live version as serving
    nothing."""
    from router.agreement import agreement_kind, answers_agree
    from router.artifact import load_manifest
    from router.lm_structured import KIND, load_structured_model
    from router.student import answer_all, load_student

    manifest = load_manifest(row["artifact_path"], expected_checksum=row["checksum"])
    if row["kind"] == KIND:
        from distiller.lm.structured import confidences, score

        model = load_structured_model(row["artifact_path"], manifest)
        scored = score(model, [model.template.strip(p.messages) for p in pairs], [p.answer for p in pairs],
                       batch_size=batch_size, progress=progress, desc=f"live v{row['version']}")
        return confidences(model.calibrator, scored), scored.agree.astype(float)
    how = agreement_kind(row["kind"], manifest.get("answer_format"))
    student = load_student(row["artifact_path"], expected_checksum=row["checksum"])
    try:
        outputs = answer_all(student, [p.messages for p in pairs])
    finally:
        student.close()
    conf = [float(o.confidence) if o is not None else 0.0 for o in outputs]
    correct = [1.0 if o is not None and answers_agree(how, o.text, p.answer) else 0.0 for o, p in zip(outputs, pairs)]
    return conf, correct


def score_live(result: GateResult, row: dict[str, Any], pairs: Sequence[Any], served: Callable[..., tuple[float, float, int, float]],
               *, route: str, batch_size: int = 8, progress: bool = False) -> GateResult:
    """Fill in ``result``'s live side: the live version (``row``) run on the compared ``pairs``
    (:func:`live_scores`) and ``served(confidence, correct, own_curve)`` at its own threshold. A live
    version that cannot be loaded or run serves nothing: a broken student must not block a working one."""
    t0 = time.monotonic()
    try:
        conf, correct = live_scores(row, pairs, batch_size=batch_size, progress=progress)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run it means it serves nothing
        log.warning("route %s: live version %s cannot be run on the validation pairs (%s); its coverage counts as 0",
                    route, row["version"], exc)
        result.live, result.live_raw = 0.0, 0.0
        return result
    result.live, result.live_agreement, result.live_served_pairs, result.live_raw = served(conf, correct, row.get("curve"))
    result.live_scored = True
    log.info("route %s: live v%s run on %d validation pairs in %.0f s", route, row["version"], len(pairs),
             time.monotonic() - t0)
    return result
