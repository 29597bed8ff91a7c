"""The watch worker: retrain each route after N new teacher pairs or T minutes.

Runs in-process (a background thread of ``kdgate serve``, at lower OS priority) or as its own
process::

    python -m distiller.worker --db kdgate.db [--artifacts DIR] [--config-json '{"retrain_after_pairs": 200}']

It stops cleanly between steps on SIGTERM/SIGINT (or when ``stop`` is set): a training run in
progress finishes its current route first, so no half-written version is ever registered.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distiller import registry
from distiller.config import ConfigError, DistillerConfig
from distiller.pipeline import DistillReport, distill_route
from store import StoreError, WorkerLock
from store import registry as store_registry

log = logging.getLogger(__name__)

__all__ = ["Worker", "RouteState", "start_embedded_worker", "spawn_worker_process", "main"]

SPEND_WINDOW_S = 600.0  # the teacher spend rate the schedule weighs routes by is this recent


@dataclass
class RouteState:
    """What the worker remembers about a route between polls."""

    last_exchange_id: int = 0  # newest exchange the last run saw
    last_run: float = 0.0  # when it last ran (trained or not)
    last_status: str = ""
    finetuned_pairs: int = 0  # training pairs at the last encoder fine-tuning
    pairs_at_last_run: int = 0  # teacher pairs the route had when it last ran (the young-route schedule)
    last_seconds: float = 0.0  # how long its last head run took (the schedule's cost estimate)
    last_coverage: float = 0.0  # the coverage at target its live version reported


@dataclass
class Worker:
    """Polls the ledger and retrains routes whose data has grown enough."""

    db_path: str
    config: DistillerConfig = field(default_factory=DistillerConfig)
    artifacts_root: Path | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    states: dict[str, RouteState] = field(default_factory=dict)
    reports: list[DistillReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        from store import Ledger

        self.ledger = Ledger(self.db_path)
        self._finetunes: dict[str, threading.Thread] = {}
        self._reports_lock = threading.Lock()

    def route_names(self) -> list[str]:
        """Routes with teacher traffic (configured or discovered)."""
        return self.ledger.routes_with_teacher_pairs()

    def _state(self, route: str) -> RouteState:
        st = self.states.get(route)
        if st is None:
            st = RouteState()
            newest = registry.list_students(self.ledger, route)
            if newest:  # resume after a restart from what the last registered version saw
                st.last_exchange_id = int(newest[0]["metrics"].get("last_exchange_id", 0))
                st.last_run = float(newest[0]["created"])
                st.pairs_at_last_run = int(newest[0].get("train_pairs") or 0) + int(newest[0].get("val_pairs") or 0)
            self.states[route] = st
        return st

    def due(self, route: str, now: float | None = None) -> tuple[bool, str]:
        """Whether a route should be retrained now, and why."""
        now = time.time() if now is None else now
        st = self._state(route)
        cfg = self.config.for_route((self.ledger.route(route) or {}).get("settings"))
        new = self.ledger.count_exchanges(route, since_id=st.last_exchange_id, served_by="teacher", status=200)
        if new == 0:
            return False, "no new pairs"
        if st.last_run == 0.0:
            return True, f"{new} pairs and no run yet"
        if st.last_status == "insufficient" and st.pairs_at_last_run + new >= cfg.min_pairs:
            return True, f"{st.pairs_at_last_run + new} pairs, enough for a first student (min_pairs={cfg.min_pairs})"
        # A young route retrains each time its pairs have doubled (50, 100, 200, 400, ...) until
        # retrain_after_pairs is the smaller step: its first versions serve within a few hundred pairs.
        step = min(cfg.retrain_after_pairs, max(cfg.min_pairs, st.pairs_at_last_run))
        if new >= step:
            return True, f"{new} new pairs (retrain after {step}; retrain_after_pairs={cfg.retrain_after_pairs})"
        if now - st.last_run >= cfg.retrain_after_minutes * 60:
            return True, f"{new} new pairs and {cfg.retrain_after_minutes:g} minutes since the last run"
        return False, f"{new} new pairs, waiting"

    def expected_saving_rate(self, route: str, now: float | None = None) -> float:
        """What training ``route`` now is expected to save per CPU-second: its teacher spend rate
        (dollars per second over the last ``SPEND_WINDOW_S``) times the share of it a new version
        is expected to take over (the uncovered share, ``1 - coverage``, scaled by how much its data
        grew since the last run), over the seconds its last run took. Used to order due routes."""
        now = time.time() if now is None else now
        st = self._state(route)
        spend = self.ledger.teacher_spend_since(route, now - SPEND_WINDOW_S) / SPEND_WINDOW_S
        new = self.ledger.count_exchanges(route, since_id=st.last_exchange_id, served_by="teacher", status=200)
        growth = new / max(1, st.pairs_at_last_run + new)
        gain = (1.0 - st.last_coverage) * max(growth, 0.05)
        return spend * gain / max(st.last_seconds, 1.0)

    def step(self) -> list[DistillReport]:
        """One pass over the due routes, the one expected to save most per CPU-second first (see
        :meth:`expected_saving_rate`), or with ``schedule = "in_turn"`` the one that waited longest
        (never trained first). Returns this pass's reports."""
        out = []
        due_routes = []
        for route in self.route_names():
            due, why = self.due(route)
            if due:
                due_routes.append((self.expected_saving_rate(route), route, why))
        if self.config.schedule == "in_turn":
            due_routes.sort(key=lambda x: self._state(x[1]).last_run)
        else:
            due_routes.sort(key=lambda x: -x[0])
        for score, route, why in due_routes:
            if self.stop.is_set():
                break
            log.info("distilling route %s: %s (expected saving %.3g $/CPU-s)", route, why, score)
            st = self._state(route)
            cfg = self.config.for_route((self.ledger.route(route) or {}).get("settings"))
            pairs_now = st.pairs_at_last_run + self.ledger.count_exchanges(
                route, since_id=st.last_exchange_id, served_by="teacher", status=200)
            t0 = time.monotonic()
            report = self._distill(route, cfg, st)
            if report.status == "interrupted":
                break  # stopping: the route is retried from the same point next time
            st.last_seconds = time.monotonic() - t0  # the schedule's cost estimate for the route
            st.pairs_at_last_run = pairs_now
            if report.status == "trained":
                st.last_coverage = float((report.metrics or {}).get("coverage_at_target") or 0.0)
            st.last_exchange_id = report.last_exchange_id
            if report.status != "insufficient":
                # an insufficient route trained nothing: it is tried again with its next new pair,
                # not only after retrain_after_pairs more
                st.last_run = time.time()
            st.last_status = report.status
            out.append(report)
            with self._reports_lock:
                self.reports.append(report)
        return out

    def _distill(self, route: str, cfg: DistillerConfig, st: RouteState) -> DistillReport:
        """One run for a due route: the student kind its data calls for, trained and gated."""
        extraction = self._extraction(route, cfg) if cfg.lm_base_model else False
        if extraction is None:
            # Too few pairs to tell an extraction route from a label one. Not the label student by default:
            # the pairs arriving while it reads could take it past min_pairs and give an extraction route a
            # label student (seen in tests/gateway/test_lm_structured_e2e.py on a quiet machine).
            have = self.ledger.count_exchanges(route, served_by="teacher", status=200)
            last_id = self.ledger.max_exchange_id(route)
            self.ledger.record_event(route, "distill.insufficient", actor="distiller",
                                     detail={"have": have, "need": cfg.min_pairs})
            return DistillReport(route, "insufficient", f"{have} pairs; the student kind is decided at {cfg.min_pairs}",
                                 have=have, need=cfg.min_pairs, last_exchange_id=last_id)
        tried_lm = bool(extraction)
        if tried_lm:
            # values copied from the request (names, dates, places) are beyond a label head, which answers
            # only values it has seen: the structured LM student takes the route (and no encoder fine-tuning)
            report = self._run_lm(route, cfg)
            if report.status != "failed":
                return report
            log.warning("route %s: the LM student failed (%s); the label student is trained instead", route,
                        report.message)
        report = self._run(route, self.config.with_overrides({"finetune": "never"}))
        if report.status == "free_text" and cfg.lm_base_model and not tried_lm:
            return self._run_lm(route, cfg)
        if report.status == "trained" and self._wants_finetune(cfg, st, report):
            # the head is retrained (and served) first; the slow encoder fine-tuning comes second,
            # only when the frozen student falls short and the data has grown enough since the last one
            self._start_finetune(route, st, self._train_pairs(route, report))
        return report

    def finetuning(self, route: str) -> bool:
        thread = self._finetunes.get(route)
        return thread is not None and thread.is_alive()

    def _start_finetune(self, route: str, st: RouteState, train_pairs: int) -> None:
        """Fine-tune the route's encoder on a background thread (one per route at a time).

        Fine-tuning takes minutes; meanwhile the head retrains go on (each new pair still reaches the
        served student within a poll or two), and the next head retrain after it registers reuses
        the tuned encoder.
        """
        if self.finetuning(route):
            return
        before = st.finetuned_pairs
        st.finetuned_pairs = train_pairs  # the growth rule counts from this run, unless it was interrupted

        def job() -> None:
            tuned = self._run(route, self.config.with_overrides({"finetune": "always"}))
            if tuned.status == "interrupted":
                st.finetuned_pairs = before
            log.info("route %s: encoder fine-tuning run ended: %s %s", route, tuned.status, tuned.message)
            with self._reports_lock:
                self.reports.append(tuned)

        thread = threading.Thread(target=job, name=f"finetune-{route}", daemon=True)
        self._finetunes[route] = thread
        thread.start()

    def join_finetunes(self, timeout: float | None = None) -> None:
        """Wait for background fine-tuning runs (tests; shutdown, after ``stop`` interrupts them)."""
        for thread in list(self._finetunes.values()):
            thread.join(timeout)

    def _run(self, route: str, config: DistillerConfig) -> DistillReport:
        t0 = time.monotonic()
        def run() -> DistillReport:
            try:
                return distill_route(self.ledger, route, config, artifacts_root=self.artifacts_root, stop=self.stop)
            except Exception as exc:  # one route's failure must not stop the worker
                log.exception("distilling route %s failed", route)
                self.ledger.record_event(route, "distill.failed", actor="distiller", detail={"error": str(exc)})
                return DistillReport(route, "failed", str(exc), last_exchange_id=self.ledger.max_exchange_id(route))

        report = self._bracketed(route, config.finetune, run)
        if report.status in ("trained", "failed"):
            # the gateway's /metrics reads these (the worker is another process)
            self.ledger.record_event(route, "distill.run", actor="distiller", detail={
                "seconds": round(time.monotonic() - t0, 3), "ok": report.status == "trained",
                "version": report.version, "encoder": (report.metrics or {}).get("encoder")})
        return report

    def _train_pairs(self, route: str, report: DistillReport) -> int:
        """The version's training pairs, counting those its validation reached back for (cascade
        mode), so the growth rule measures the route's data rather than how it was split."""
        return store_registry.counted_train_pairs(self.ledger, route, report.version)

    def _wants_finetune(self, cfg: DistillerConfig, st: RouteState, report: DistillReport) -> bool:
        if cfg.finetune == "never":
            return False
        metrics = report.metrics or {}
        train_pairs = self._train_pairs(route=report.route, report=report)
        if cfg.finetune == "auto" and float(metrics.get("coverage_at_target", 0.0)) >= cfg.finetune_below_coverage:
            return False
        if train_pairs < cfg.finetune_min_pairs:
            return False
        return st.finetuned_pairs == 0 or train_pairs >= cfg.finetune_growth * st.finetuned_pairs

    def _extraction(self, route: str, cfg: DistillerConfig) -> bool | None:
        """Whether the route is an extraction route (:func:`distiller.lm.structured.looks_like_extraction`),
        decided on its newest pairs with the static template stripped; None while it has fewer than
        ``min_pairs`` (undecided)."""
        from distiller.lm.structured import looks_like_extraction
        from router.template import learn_template

        pairs = [p for p in self.ledger.teacher_pairs(route) if p.answer and p.answer.strip()][-2000:]
        if cfg.lm_settings.get("answer_grammar") == "off":
            return False
        if len(pairs) < cfg.min_pairs:
            return None
        template = learn_template([p.messages for p in pairs])
        yes, why = looks_like_extraction([template.strip(p.messages) for p in pairs], [p.answer for p in pairs])
        self.ledger.record_event(route, "distill.student_kind", actor="distiller",
                                 detail={"kind": "lm" if yes else "label", "reason": why})
        log.info("route %s: %s", route, why)
        return yes

    def _bracketed(self, route: str, finetune: str, run: Callable[[], DistillReport]) -> DistillReport:
        """``run()`` between ``distill.started`` and ``distill.finished`` (with the report's status),
        whatever the student kind: benches that pace their stream by the distiller (bench replay
        --paced) read them. ``run`` reports its own failures; anything it raises is recorded as failed."""
        t0 = time.monotonic()
        status = "failed"
        self.ledger.record_event(route, "distill.started", actor="distiller",
                                 detail={"last_exchange_id": self.ledger.max_exchange_id(route), "finetune": finetune})
        try:
            report = run()
            status = report.status
            return report
        finally:
            self.ledger.record_event(route, "distill.finished", actor="distiller",
                                     detail={"status": status, "seconds": round(time.monotonic() - t0, 3),
                                             "finetune": finetune})

    def _run_lm(self, route: str, cfg: DistillerConfig) -> DistillReport:
        """A free-text route with a base LM configured: distil an LM student."""
        from distiller.lm.config import LMTrainConfig
        from distiller.lm.train import distill_lm_route

        t0 = time.monotonic()
        last_id = self.ledger.max_exchange_id(route)

        def run() -> DistillReport:
            try:
                lm_cfg = LMTrainConfig.from_dict({**cfg.lm_settings, "base_model": cfg.lm_base_model},
                                                 preset_name=cfg.lm_preset)
                out = distill_lm_route(self.db_path, route, lm_cfg, artifacts_dir=self.artifacts_root)
            except Exception as exc:
                log.exception("LM distillation of route %s failed", route)
                return DistillReport(route, "failed", str(exc), last_exchange_id=last_id)
            return DistillReport(route, "trained", f"lm student v{out.get('version')}: {out.get('status')}",
                                 version=out.get("version"), metrics=out.get("metrics") or {}, last_exchange_id=last_id)

        report = self._bracketed(route, "never", run)
        self.ledger.record_event(route, "distill.run", actor="distiller", detail={
            "seconds": round(time.monotonic() - t0, 3), "ok": report.status == "trained", "kind": "lm"})
        return report

    def run(self) -> None:
        """Poll until ``stop`` is set."""
        log.info("distiller worker watching %s", self.db_path)
        while not self.stop.is_set():
            self.step()
            self.stop.wait(self.config.poll_seconds)
        self.join_finetunes()  # stop interrupts a fine-tuning between steps; nothing half-done registers
        log.info("distiller worker stopped")


def _lower_priority(niceness: int) -> None:
    # On Linux a niceness set by thread id applies to that thread only, so the embedded worker
    # yields the CPU to the serving threads of the same process.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError, PermissionError) as exc:
        log.debug("could not lower the distiller's priority: %s", exc)


def start_embedded_worker(
    db_path: str | Path,
    config: DistillerConfig | None = None,
    *,
    artifacts_root: Path | None = None,
    niceness: int = 10,
    torch_threads: int = 1,
) -> tuple[threading.Thread, Worker]:
    """Run the worker in a daemon thread of this process (``kdgate serve``'s embedded mode).

    The thread runs at lower OS priority and, by default, torch uses one thread, so serving latency
    is not hurt. Set ``worker.stop`` and join the thread to stop it.
    """
    worker = Worker(str(db_path), config or DistillerConfig(), artifacts_root)

    def target() -> None:
        _lower_priority(niceness)
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        worker.run()

    thread = threading.Thread(target=target, name="kdgate-distiller", daemon=True)
    thread.start()
    return thread, worker


def spawn_worker_process(
    db_path: str | Path,
    config: DistillerConfig | None = None,
    *,
    artifacts_root: Path | None = None,
    niceness: int = 10,
) -> subprocess.Popen[bytes]:
    """Start ``python -m distiller.worker`` as a niced child process; terminate() stops it cleanly."""
    cmd = [sys.executable, "-m", "distiller.worker", "--db", str(db_path), "--nice", str(niceness)]
    if artifacts_root:
        cmd += ["--artifacts", str(artifacts_root)]
    if config is not None:
        cmd += ["--config-json", json.dumps(config.to_dict())]
    return subprocess.Popen(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distiller.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--db", default=None,
                        help="ledger database: a SQLite path or a postgresql:// DSN (default: $KDGATE_DB, else kdgate.db; "
                             "prefer the environment for a DSN, which a command line shows to every user)")
    parser.add_argument("--artifacts", default=None, help="artifacts directory (default: <db dir>/artifacts)")
    parser.add_argument("--config-json", default=None, help="distiller settings as a JSON object")
    parser.add_argument("--nice", type=int, default=0, help="raise this process's niceness by this much")
    parser.add_argument("--once", action="store_true", help="one pass over the routes, then exit")
    parser.add_argument("--check-config", action="store_true", help="only check --config-json, then exit (2: invalid)")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.config_json) if args.config_json else None
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError("--config-json must be a JSON object")
        config = DistillerConfig.from_dict(overrides)
    except (ConfigError, ValueError) as exc:
        print(f"error: distiller settings: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.nice:
        os.nice(args.nice)
    db = args.db or os.environ.get("KDGATE_DB") or "kdgate.db"
    try:
        lock = WorkerLock.acquire(db)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    worker = Worker(db, config, Path(args.artifacts) if args.artifacts else None)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping after the current step", signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.once:
            worker.step()
        else:
            worker.run()
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
