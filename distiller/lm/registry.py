"""Registering LM students: the shared registry (``distiller.registry``) plus the promotion gate.

The gate is the project's: a new version goes live only if, at the route's target agreement, it
covers more validation traffic than the live version (or, with no live version, any traffic at all).
:func:`gate_lm` runs the live version on the candidate's validation pairs, so the two are compared
on the same pairs (:class:`distiller.gate.GateResult`, the label students' rule); without such a
comparison (:func:`register_student` called with no ``gate``), recorded coverages decide
(:func:`should_promote`), each measured on its own validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from distiller import registry
from distiller.gate import GateResult, score_live, served_at_own_threshold

__all__ = ["next_version", "live_student", "gate_lm", "register_student", "should_promote"]

log = logging.getLogger(__name__)

next_version = registry.next_version
live_student = registry.live


def should_promote(new_metrics: dict[str, Any], live: dict[str, Any] | None) -> tuple[bool, str]:
    """The promotion gate: (promote?, why)."""
    coverage = float(new_metrics.get("coverage_at_target") or 0.0)
    if live is None:
        return coverage > 0, f"no live version; coverage at target {coverage:.3f}"
    live_cov = float(live["metrics"].get("coverage_at_target") or 0.0)
    return coverage > live_cov, f"coverage at target {coverage:.3f} vs live v{live['version']} {live_cov:.3f}"


def gate_lm(
    ledger: Any, route: str, val_pairs: Sequence[Any], confidence: Sequence[float], agree: Sequence[bool],
    curve: Sequence[dict[str, float]], *, target: float, target_confidence: float | None = None,
    batch_size: int = 8, progress: bool = False, min_pairs: int = 100,
) -> GateResult:
    """The promotion gate for an LM candidate: the live version run on the candidate's validation
    pairs (``val_pairs``, with the candidate's out-of-fold ``confidence`` and ``agree`` on them and
    its validation ``curve``), so the two are compared on the same pairs, each at the threshold its own
    curve gives, as the router serves it.

    The validation split is the newest pairs, so a version's recorded coverage is measured on the
    traffic of its day; in cascade mode that is mostly the previous version's escalations. Read from
    the metrics alone, a later version validated on a harder split loses to an older one that would
    serve even less there. Only pairs newer than the live version's data count (when at least
    ``min_pairs`` of them, else all). A live version that cannot be loaded or run serves nothing: a
    broken student must not block a working one. A structured live version is decoded in batches by
    its own decoder; any other kind answers through its loader (:func:`router.student.answer_all`).
    """
    row = registry.live(ledger, route)
    seen = int(((row or {}).get("metrics") or {}).get("last_exchange_id") or 0)
    unseen = np.array([int(p.id) > seen for p in val_pairs], dtype=bool)
    unseen_only = row is not None and bool(unseen.all() or unseen.sum() >= min_pairs)
    use = unseen if unseen_only else np.ones(len(val_pairs), dtype=bool)
    picked = [p for p, u in zip(val_pairs, use) if u]
    weights = [float(getattr(p, "weight", 1.0)) for p in picked]

    def served(conf: Any, correct: Any, own_curve: Any) -> tuple[float, float, int, float]:
        return served_at_own_threshold(conf, correct, own_curve, weights=weights, target=target,
                                       target_confidence=target_confidence)

    result = GateResult(candidate=0.0, live=None, pairs=len(picked), unseen_only=unseen_only, target=target,
                        live_version=row["version"] if row else None)
    (result.candidate, result.candidate_agreement, result.candidate_served_pairs, result.candidate_raw) = served(
        np.asarray(confidence, dtype=np.float64)[use], np.asarray(agree, dtype=np.float64)[use], curve)
    if row is None:
        return result
    return score_live(result, row, picked, served, route=route, batch_size=batch_size, progress=progress)


def register_student(ledger: Any, *, promote: bool = True, gate: GateResult | None = None, **row: Any) -> dict[str, Any]:
    """Register a candidate (``row``: the keyword arguments of :func:`distiller.registry.register`) and,
    if ``promote`` and the gate passes, make it live. ``gate``: the comparison with the live version
    on the same pairs (:func:`gate_lm`); without it, the recorded
    coverages decide (:func:`should_promote`). Returns the row as stored."""
    stored = registry.register(ledger, **row)
    if not promote:
        return stored
    if gate is not None:
        ok = gate.candidate_wins()
        why = gate.promotion_reason() if ok else gate.kept_reason()
    else:
        ok, why = should_promote(row["metrics"], registry.live(ledger, row["route"]))
    log.info("route %s: lm student v%d %s (%s)", row["route"], row["version"], "promoted" if ok else "kept as candidate", why)
    if ok:
        stored = registry.promote(ledger, row["route"], row["version"], reason=why)
    elif gate is not None:
        ledger.record_event(row["route"], "student.kept_candidate", actor="distiller", detail=gate.kept_detail(row["version"]))
    return stored
