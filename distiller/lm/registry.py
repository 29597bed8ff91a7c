"""Registering LM students: the shared registry (``distiller.registry``) plus the promotion gate.

The gate is the project's: a new version goes live only if, at the route's target agreement, it
covers more validation traffic than the live version (or, with no live version, any traffic at all).
Structured students pass the comparison on the same pairs (:class:`distiller.gate.GateResult`, the
live version decoded on the candidate's validation pairs). Free-text LM students still compare
recorded coverages (:func:`should_promote`), each measured on its own validation split.
"""

from __future__ import annotations

import logging
from typing import Any

from distiller import registry
from distiller.gate import GateResult

__all__ = ["next_version", "live_student", "register_student", "should_promote"]

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


def register_student(ledger: Any, *, promote: bool = True, gate: GateResult | None = None, **row: Any) -> dict[str, Any]:
    """Register a candidate (``row``: the keyword arguments of :func:`distiller.registry.register`) and,
    if ``promote`` and the gate passes, make it live. ``gate``: the comparison with the live version
    on the same pairs (:func:`distiller.lm.structured.gate_structured`); without it, the recorded
    coverages decide (:func:`should_promote`). Returns the row as stored."""
    stored = registry.register(ledger, **row)
    if promote and gate is not None:
        ok = gate.candidate_wins()
        why = gate.promotion_reason() if ok else gate.kept_reason()
        log.info("route %s: lm student v%d %s (%s)", row["route"], row["version"], "promoted" if ok else "kept as candidate", why)
        if ok:
            stored = registry.promote(ledger, row["route"], row["version"], reason=why)
        else:
            ledger.record_event(row["route"], "student.kept_candidate", actor="distiller",
                                detail=gate.kept_detail(row["version"]))
    elif promote:
        ok, why = should_promote(row["metrics"], registry.live(ledger, row["route"]))
        log.info("route %s: lm student v%d %s (%s)", row["route"], row["version"], "promoted" if ok else "kept as candidate", why)
        if ok:
            stored = registry.promote(ledger, row["route"], row["version"], reason=why)
    return stored
