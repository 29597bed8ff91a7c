"""Prometheus metrics for one gateway, in a registry of its own (never the process-global one).

Two apps in one process (tests start several) each count their own traffic. ``GET /metrics`` renders
:meth:`Metrics.render`. The hot path only increments counters and observes histograms: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

# Seconds. Students answer in milliseconds, teachers in seconds; overhead should stay under a few ms.
_ANSWER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_RUN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class Metrics:
    """The gateway's counters and histograms.

    ``queue_depth`` is called at scrape time for the ledger write queue depth (a gauge callback), so
    the gauge is always current without the writer having to report it.
    """

    def __init__(self, *, queue_depth: Callable[[], float] | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kdgate_requests", "Answered requests, by route and who served them (student or teacher).",
            ["route", "served_by"], registry=r,
        )
        self.errors = Counter("kdgate_errors", "Requests that ended in an error status, by route.", ["route", "status"], registry=r)
        self.escalations = Counter(
            "kdgate_escalations", "Requests the student was asked first and the teacher answered.", ["route"], registry=r
        )
        self.latency = Histogram(
            "kdgate_answer_latency_seconds", "Time to answer a request, by route and who served it.",
            ["route", "served_by"], buckets=_ANSWER_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "kdgate_gateway_overhead_seconds", "Time the gateway itself adds to a request (total minus upstream).",
            buckets=_OVERHEAD_BUCKETS, registry=r,
        )
        self.tokens = Counter("kdgate_tokens", "Tokens, by route and kind (prompt or completion).", ["route", "kind"], registry=r)
        self.cost = Counter("kdgate_cost_usd", "What answering actually cost, in USD.", ["route", "served_by"], registry=r)
        self.counterfactual = Counter(
            "kdgate_teacher_only_cost_usd", "What the teacher alone would have cost, in USD.", ["route"], registry=r
        )
        self.savings = Counter(
            "kdgate_savings_usd", "Teacher-only cost minus actual cost, in USD (student answers).", ["route"], registry=r
        )
        self.distiller_runs = Counter(
            "kdgate_distiller_runs", "Distiller runs, by route and outcome (ok or failed).", ["route", "outcome"], registry=r
        )
        self.distiller_seconds = Histogram(
            "kdgate_distiller_run_seconds", "Duration of distiller runs.", ["route"], buckets=_RUN_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("kdgate_ledger_queue_depth", "Rows waiting in the ledger write queue.", registry=r)
        self.set_queue_depth(queue_depth)

    def set_queue_depth(self, fn: Callable[[], float] | None) -> None:
        """Point the queue-depth gauge at a callable read at scrape time (None: report 0)."""

        def read() -> float:
            if fn is None:
                return 0.0
            try:
                return float(fn())
            except Exception:  # a scrape must not fail because the writer is gone
                log.debug("ledger queue depth unavailable", exc_info=True)
                return 0.0

        self.queue_depth.set_function(read)

    # -- hooks the serving path calls ---------------------------------------------------------
    def observe_exchange(
        self, route: str, served_by: str, seconds: float, cost_usd: float, counterfactual_usd: float, usage: Any
    ) -> None:
        """One answered request: count, latency, tokens, cost and saving."""
        self.requests.labels(route, served_by).inc()
        self.latency.labels(route, served_by).observe(max(0.0, seconds))
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        completion = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
        if prompt:
            self.tokens.labels(route, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(route, "completion").inc(completion)
        cost = max(0.0, float(cost_usd or 0.0))
        teacher_only = max(0.0, float(counterfactual_usd or 0.0))
        self.cost.labels(route, served_by).inc(cost)
        self.counterfactual.labels(route).inc(teacher_only)
        if teacher_only > cost:  # counters only go up; a dearer-than-teacher answer saves nothing
            self.savings.labels(route).inc(teacher_only - cost)

    def observe_error(self, route: str, status: int) -> None:
        """A request that ended in an error status."""
        self.errors.labels(route, str(status)).inc()

    def observe_escalation(self, route: str) -> None:
        """The student was asked first and its confidence was under the threshold (or it failed)."""
        self.escalations.labels(route).inc()

    def observe_overhead(self, seconds: float) -> None:
        """The gateway's own time on one request (total minus the time spent waiting upstream)."""
        self.overhead.observe(max(0.0, seconds))

    def observe_distiller_run(self, route: str, seconds: float, ok: bool) -> None:
        """One distiller run (train, evaluate, maybe promote) finished."""
        self.distiller_runs.labels(route, "ok" if ok else "failed").inc()
        self.distiller_seconds.labels(route).observe(max(0.0, seconds))

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
