"""``kdgate bench replay`` and ``kdgate demo``: a request stream through the live gateway.

The teacher is the stand-in replay server (``bench.standin``), which answers each request with the
stream's ``answer`` and reports usage, so the gateway prices it at a real model's rates (gpt-4o by
default). The gateway runs as it does in production (``kdgate serve`` with its embedded distiller, in
their own processes); requests go through the official ``openai`` client. Agreement is with the
stand-in teacher, i.e. with the stream's gold answers.
"""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stack import Stack, child_env, write_results

__all__ = ["run_replay", "replay_metrics", "demo_stream", "load_stream", "stream_name", "distiller_overrides", "format_table",
           "score_versions", "version_scores_by_route", "mix_streams"]


def load_stream(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` (or all) ``{messages, answer}`` rows of a JSONL stream; ValueError if it holds none."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if "messages" not in row or "answer" not in row:
                    raise ValueError(f"{path}: every line needs 'messages' and 'answer'")
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
    if not rows:
        raise ValueError(f"{path} holds no requests")
    return rows


def stream_name(path: Path) -> str:
    """The results name of a stream file: its stem, or ``<folder>-<stem>`` for a generic train/test/stream."""
    return f"{path.parent.name}-{path.stem}" if path.stem in ("train", "test", "stream") else path.stem


def mix_streams(streams: Sequence[tuple[str, list[dict[str, Any]]]], *, seed: int = 0) -> list[dict[str, Any]]:
    """Several tasks' streams as one application's traffic under one model name: each keeps its own
    order, the stream each next request comes from is drawn at random in proportion to the requests
    it has left (so they interleave evenly and end together), and each row names its stream as its
    ``route`` (sent as ``X-KDGate-Route``). Names repeated are numbered (``name``, ``name-2``)."""
    import random

    names: list[str] = []
    for name, _ in streams:
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}-{k}", k + 1
        names.append(unique)
    left = [list(reversed(rows)) for _, rows in streams]
    rng = random.Random(seed)
    out = []
    while any(left):
        i = rng.choices(range(len(left)), weights=[len(x) for x in left])[0]
        out.append({**left[i].pop(), "route": names[i]})
    return out


def demo_stream(limit: int | None = None) -> list[dict[str, Any]]:
    """The bundled banking77 stream (CC BY 4.0), prompts built on the fly."""
    data = resources.files("bench") / "data"
    system = (data / "banking77_system_prompt.txt").read_text()
    rows = []
    with gzip.open(str(data / "banking77.csv.gz"), "rt", newline="") as fh:
        for rec in csv.DictReader(fh):
            rows.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": rec["text"]}], "answer": rec["intent"]})
            if limit and len(rows) >= limit:
                break
    return rows


def replay_stack(stream_path: Path, workdir: Path, *, teacher_model: str, port: int | None, distiller: dict[str, Any],
                 admin_key: str | None, route_settings: dict[str, Any], routes: Sequence[str] = ()) -> Stack:
    """The stand-in teacher replaying ``stream_path`` and ``kdgate serve`` with its embedded distiller,
    one route (``replay``) whose alias is the teacher's model name, and one per name in ``routes``
    (named by the requests' ``X-KDGate-Route``), all with ``route_settings``."""
    named = {name: dict(route_settings) for name in routes if name != "replay"}
    settings: dict[str, Any] = {"default_shadow_rate": 0.02, "admin_key": admin_key, "distiller": distiller or None,
                                "routes": {"replay": {"aliases": [teacher_model], **route_settings}, **named}}
    return Stack(workdir, settings=settings, teacher_model=teacher_model, dataset=stream_path, port=port)


class Pacer:
    """``--paced``: the stream waits while the distiller trains, so a replay measures how much each
    teacher pair teaches rather than how fast this CPU trains.

    A thread watches the ledger: the worker records ``distill.started`` (with the newest exchange id
    it will train on) and ``distill.finished`` around every run, head retrain or encoder
    fine-tuning alike. The stream is held while a run is in progress, and while one is due by the
    worker's own schedule (its pairs have doubled, or ``retrain_after_pairs`` arrived) but has not
    started yet; after a run it waits one registry poll more, so the gateway serves the new version.
    Held time is not counted in the stream's clock (``held_s``).
    """

    def __init__(self, db: Path, distiller: dict[str, Any], *, poll_s: float = 0.2, gateway_poll_s: float = 2.5,
                 wait_for_finetune: bool = True):
        from store import Ledger

        self.ledger = Ledger(str(db))
        self.retrain_after = int(distiller.get("retrain_after_pairs", 500))
        self.min_pairs = int(distiller.get("min_pairs", 50))
        self.grace_s = 3 * float(distiller.get("poll_seconds", 2.0)) + 10.0
        self.poll_s, self.gateway_poll_s = poll_s, gateway_poll_s
        self.open = threading.Event()
        self.open.set()
        self.wait_for_finetune = wait_for_finetune
        self.held_s = 0.0
        self.holds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pacer", daemon=True)

    def start(self) -> Pacer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.open.set()

    def wait(self) -> None:
        self.open.wait()

    def _busy(self) -> tuple[bool, bool]:
        """(a run is in progress, a run is due and has not started)."""
        running = due = False
        for route in self.ledger.routes_with_teacher_pairs():
            events = self.ledger.events(route, limit=400)
            tuning = [e for e in events if (e["detail"] or {}).get("finetune") == "always"]
            if self.wait_for_finetune and sum(e["kind"] == "distill.started" for e in tuning) > \
                    sum(e["kind"] == "distill.finished" for e in tuning):
                running = True
                continue
            started = [e for e in events if e["kind"] == "distill.started" and e not in tuning]
            finished = [e for e in events if e["kind"] == "distill.finished" and e not in tuning]
            if len(started) > len(finished):
                running = True
                continue
            if not started:
                continue  # the worker's first look comes within its poll; nothing to wait for yet
            last = started[0]["detail"] or {}
            since = int(last.get("last_exchange_id") or 0)
            before = self.ledger.count_exchanges(route, served_by="teacher", status=200) - \
                self.ledger.count_exchanges(route, since_id=since, served_by="teacher", status=200)
            new = self.ledger.count_exchanges(route, since_id=since, served_by="teacher", status=200)
            first = (finished[0]["detail"] or {}).get("status") == "insufficient" if finished else False
            step = self.min_pairs - before if first else min(self.retrain_after, max(self.min_pairs, before))
            if new >= max(1, step):
                due = True
        return running, due

    def _watch(self) -> None:
        held_since = None
        due_since = None
        while not self._stop.is_set():
            try:
                running, due = self._busy()
            except Exception:  # a locked ledger for a moment: look again
                running, due = True, False
            now = time.monotonic()
            due_since = (due_since or now) if due and not running else None
            stalled = due_since is not None and now - due_since > self.grace_s  # the worker does not agree it is due
            hold = running or (due and not stalled)
            if hold and self.open.is_set():
                self.open.clear()
                held_since = now
                self.holds += 1
            elif not hold and not self.open.is_set():
                time.sleep(self.gateway_poll_s)  # the gateway loads a promoted version within its poll
                self.held_s += time.monotonic() - (held_since or now)
                self.open.set()
            time.sleep(self.poll_s)


def send_stream(rows: list[dict[str, Any]], base_url: str, *, model: str, rate: float, concurrency: int, progress: bool = True,
                pacer: Pacer | None = None, route_header: str | None = None) -> list[dict[str, Any]]:
    """Send every request in order (``rate`` per second at most, 0 = as fast as answered). With a
    ``pacer``, each request waits while the distiller trains, and the held time does not count
    against the rate. On any exception (SIGTERM in the bench becomes SystemExit) no further request
    is sent and the exception propagates at once."""
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=2, timeout=120)
    results: list[dict[str, Any] | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="replay", unit="req", disable=not progress)
    lock = threading.Lock()
    start = time.monotonic()
    stopping = threading.Event()

    def one(i: int) -> None:
        if stopping.is_set():
            return
        if pacer is not None:
            pacer.wait()
        if rate > 0:
            delay = start + (pacer.held_s if pacer else 0.0) + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if stopping.is_set():
            return
        extra = {"X-KDGate-Route": rows[i]["route"]} if route_header and rows[i].get("route") else None
        raw = client.chat.completions.with_raw_response.create(model=model, messages=rows[i]["messages"],
                                                               extra_headers=extra)
        resp = raw.parse()
        results[i] = {"uid": raw.headers.get("x-request-id"), "served_by": raw.headers.get("x-kdgate-served-by"),
                      "route": raw.headers.get("x-kdgate-route"), "answer": resp.choices[0].message.content}
        with lock:
            bar.update(1)
            if bar.n % 200 == 0:
                served = sum(1 for r in results[max(0, i - 500): i + 1] if r and r["served_by"] == "student")
                bar.set_postfix(student_recent=f"{served / max(1, min(500, i + 1)):.0%}")

    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        for fut in [pool.submit(one, i) for i in range(len(rows))]:
            fut.result()
    except BaseException:
        stopping.set()
        if pacer is not None:
            pacer.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    bar.close()
    return [r for r in results if r is not None]


def stream_answer_kind(rows: list[dict[str, Any]]) -> str:
    """How a stream's answers are compared (router.agreement): ``json`` when they are JSON objects,
    else ``label`` (the replayed streams are label and extraction routes)."""
    import json

    def is_object(a: Any) -> bool:
        try:
            return isinstance(json.loads(a), dict)
        except (TypeError, ValueError):
            return False

    sample = [r["answer"] for r in rows[:200]]
    return "json" if sample and all(is_object(a) for a in sample) else "label"


def replay_metrics(rows: list[dict[str, Any]], sent: list[dict[str, Any]], ledger_rows: dict[str, dict[str, Any]], *,
                   ceiling: float | None = None, target: float = 0.98) -> dict[str, Any]:
    """Saving and quality over the stream, its last quarter, a threshold sweep and baselines; when
    the student first served and the worst window after it; with ``ceiling`` (the best fixed
    threshold's last-quarter share, :func:`ceiling_share`), ``ceiling_ratio``."""
    import numpy as np

    from router.agreement import answers_agree

    kind = stream_answer_kind(rows)
    n = len(sent)
    served = np.array([s["served_by"] == "student" for s in sent])
    correct = np.array([answers_agree(kind, s["answer"], r["answer"]) for s, r in zip(sent, rows)])
    cost = np.array([ledger_rows.get(s["uid"], {}).get("cost_usd") or 0.0 for s in sent])
    counter = np.array([ledger_rows.get(s["uid"], {}).get("counterfactual_usd") or 0.0 for s in sent])
    conf = np.array([(ledger_rows.get(s["uid"], {}).get("confidence")) for s in sent], dtype=object)
    student_ans = [ledger_rows.get(s["uid"], {}).get("student_answer") for s in sent]
    has_student = np.array([c is not None and a is not None for c, a in zip(conf, student_ans)])
    conf_f = np.array([float(c) if c is not None else -1.0 for c in conf])
    student_correct = np.array([answers_agree(kind, a, r["answer"]) for a, r in zip(student_ans, rows)])

    def block(sl: slice) -> dict[str, float]:
        cf = counter[sl].sum()
        return {
            "requests": int(len(served[sl])),
            "student_share": round(float(served[sl].mean()), 4),
            "agreement": round(float(correct[sl].mean()), 4),
            "saved_fraction": round(float(1 - cost[sl].sum() / cf), 4) if cf > 0 else 0.0,
            "teacher_spend_usd": round(float(cf), 6),
            "actual_spend_usd": round(float(cost[sl].sum()), 6),
        }

    q = n - n // 4
    # teacher price of each request, for the sweep: the counterfactual where the student answered,
    # the actual teacher cost where it escalated
    teacher_cost = np.where(counter > 0, counter, cost)
    total = teacher_cost.sum() or 1.0
    q_weak = float(np.where(has_student, student_correct, True).mean())
    thresholds = np.unique(np.r_[conf_f[has_student], 0.0, 1.01])
    sweep = []
    for t in thresholds:
        use = has_student & (conf_f >= t)
        quality = float(np.where(use, student_correct, True).mean())
        sweep.append({"threshold": round(float(t), 6), "teacher_calls": round(float(1 - use.mean()), 5),
                      "teacher_cost_share": round(float(teacher_cost[~use].sum() / total), 5), "agreement": round(quality, 5)})
    sweep.sort(key=lambda p: p["teacher_calls"])
    gap = 1.0 - q_weak
    pgr = [(p["teacher_calls"], (p["agreement"] - q_weak) / gap if gap > 0 else 1.0) for p in sweep]
    xs = np.array([x for x, _ in pgr])
    ys = np.clip(np.array([y for _, y in pgr]), 0, 1)
    lo = float(xs.min()) if len(xs) else 0.0
    apgr = float(np.trapezoid(ys, xs) / (1 - lo)) if len(xs) > 1 and lo < 1 else 1.0
    cpt = {}
    for level in (50, 80, 95):
        ok = [x for x, y in pgr if y >= level / 100]
        cpt[str(level)] = round(float(min(ok)), 4) if ok else 1.0
    avail = has_student.sum()
    share = float(served.mean())
    acc_avail = float(student_correct[has_student].mean()) if avail else 0.0
    baselines = {
        "always_teacher": {"student_share": 0.0, "agreement": 1.0, "saved_fraction": 0.0},
        "random_equal_cost": {"student_share": round(share, 4), "agreement": round(1 - share * (1 - acc_avail), 4),
                               "saved_fraction": block(slice(0, n))["saved_fraction"]},
        "oracle": {"student_share": round(float((has_student & student_correct).mean()), 4), "agreement": 1.0,
                   "saved_fraction": round(float(counter[has_student & student_correct].sum() / total), 4)},
    }
    out = {"overall": block(slice(0, n)), "last_quarter": block(slice(q, n)), "apgr": round(apgr, 4), "cpt": cpt,
           "student_alone_agreement": round(q_weak, 4), "baselines": baselines, "sweep": sweep}
    out.update(cascade_figures(served, correct))
    lq = slice(q, n)
    out["ceiling_ratio"] = (ceiling_ratio(served[lq], correct[lq], conf_f[lq], ceiling, target)
                            if ceiling else None)
    out["ceiling_share"] = ceiling
    served_lq = served[lq]
    out["last_quarter"]["student_agreement"] = (round(float(correct[lq][served_lq].mean()), 4)
                                                if served_lq.any() else None)
    return out


WINDOW = 1000  # requests in the sliding window of min_window_agreement
PACED_RETRAIN_MINUTES = 1e9  # paced replays retrain by pairs only (see replay())


def cascade_figures(served: Any, correct: Any, window: int = WINDOW) -> dict[str, Any]:
    """When the student first answered, and the worst stretch after it.

    ``first_cascade_request``: the 1-based position of the first request the student answered (None:
    never). ``teacher_pairs_before_cascade``: the teacher answers before it (what the route paid to
    get there). ``min_window_agreement``: the lowest agreement of returned answers over any ``window``
    consecutive requests from the first cascade on (the whole remainder when shorter)."""
    import numpy as np

    served = np.asarray(served, dtype=bool)
    correct = np.asarray(correct, dtype=float)
    if not served.any():
        return {"first_cascade_request": None, "teacher_pairs_before_cascade": int(len(served)),
                "min_window_agreement": None}
    first = int(np.argmax(served))
    after = correct[first:]
    if len(after) <= window:
        worst = float(after.mean())
    else:
        sums = np.convolve(after, np.ones(window), mode="valid")
        worst = float(sums.min() / window)
    return {"first_cascade_request": first + 1, "teacher_pairs_before_cascade": int((~served[:first]).sum()),
            "min_window_agreement": round(worst, 4)}


def ceiling_ratio(last_quarter_served: Any, last_quarter_correct: Any, last_quarter_confidence: Any, ceiling: float,
                  target: float) -> float | None:
    """The last quarter's student share *at the target* over the ceiling's share (see
    :func:`ceiling_share`). The share at the target: of the last quarter's served answers, the most
    (by the confidence they were served at, highest first) whose agreement still meets the target, as a
    share of the last quarter; the whole student share when what it served met the target."""
    import numpy as np

    if not ceiling:
        return None
    served = np.asarray(last_quarter_served, dtype=bool)
    if not served.any():
        return 0.0
    conf = np.asarray(last_quarter_confidence, dtype=float)[served]
    ok = np.asarray(last_quarter_correct, dtype=float)[served]
    order = np.argsort(-conf, kind="mergesort")
    running = np.cumsum(ok[order]) / np.arange(1, len(order) + 1)
    meets = np.nonzero(running >= target - 1e-12)[0]
    at_target = (int(meets.max()) + 1) if len(meets) else 0
    return round(at_target / len(served) / ceiling, 4)


def ceiling_share(stream_path: Path, rows: list[dict[str, Any]], target: float, *, cache_dir: Path,
                  progress: bool = False) -> dict[str, Any]:
    """The ceiling a replay's last quarter is measured against: the distiller's own student
    (default settings, the same family the route trains) trained on every teacher answer before the
    last quarter (which no cascade route ever has: it sees only escalations and checks), scored on the
    last quarter's answers at the best fixed threshold for those answers themselves (``bench
    learning-curve`` with one size). Cached under ``cache_dir`` by the stream's digest and target."""
    import hashlib

    digest = hashlib.sha256(stream_path.read_bytes()).hexdigest()[:16]
    cache = cache_dir / f"ceiling-{digest}-{target:g}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from bench.learning_curve import run_learning_curve

    n = len(rows) - len(rows) // 4
    result = run_learning_curve([stream_path], sizes=[n], targets=[target], progress=progress, min_test=len(rows) // 4)
    point = next((p for p in result["points"] if p.get("n") == n and "coverage" in p), None)
    out = {"stream_sha256_16": digest, "target": target, "train_pairs": n, "test_pairs": result["test_pairs"],
           "share": None if point is None else round(float(point["coverage"][f"{target:g}"]), 4),
           "encoder": None if point is None else point.get("encoder"),
           "train_seconds": None if point is None else point.get("train_seconds")}
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2))
    return out


def plot(metrics: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    sw = metrics["sweep"]
    ax.plot([p["teacher_cost_share"] for p in sw], [p["agreement"] for p in sw], "-", color="#2b6cb0", label="kdgate threshold sweep")
    o = metrics["overall"]
    ax.plot([1 - o["saved_fraction"]], [o["agreement"]], "o", color="#2b6cb0", label="kdgate (as run)")
    ax.plot([1.0], [1.0], "s", color="#444", label="always teacher")
    q = metrics["student_alone_agreement"]
    ax.plot([0, 1], [q, 1.0], "--", color="#999", label="random routing")
    b = metrics["baselines"]["oracle"]
    ax.plot([1 - b["saved_fraction"]], [1.0], "*", color="#c05621", markersize=11, label="oracle")
    ax.set_xlabel("teacher spend (share of always-teacher)")
    ax.set_ylabel("agreement with teacher")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_replay(
    rows: list[dict[str, Any]],
    *,
    name: str,
    out: Path | None = None,
    teacher_model: str = "gpt-4o",
    rate: float = 25.0,
    concurrency: int = 4,
    port: int | None = None,
    workdir: Path | None = None,
    distiller: dict[str, Any] | None = None,
    route_settings: dict[str, Any] | None = None,
    keep_running: bool = False,
    admin_key: str | None = None,
    progress: bool = True,
    results_dir: Path | None = None,
    score_versions_on_last_quarter: bool = False,
    paced: bool | str = False,
    ceiling: bool | float = False,
) -> tuple[dict[str, Any], Stack | None]:
    """Replay ``rows`` through a fresh gateway and its distiller; returns the metrics (and the stack
    when ``keep_running``). ``paced``: the stream waits while the distiller trains (:class:`Pacer`).
    ``ceiling``: True computes the ceiling share for ``ceiling_ratio`` (:func:`ceiling_share`,
    cached), a number is taken as that share. Rows with a ``route`` name it (header); the metrics
    then carry ``routes``, the same figures per route."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="kdgate-replay-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stream_path = workdir / "stream.jsonl"
    write_stream(stream_path, rows)
    # Paced, the stream's clock stops while the distiller trains, so a wall-clock retrain ("any new
    # pairs after 2 minutes") would fire after a couple of minutes of holds on a handful of pairs and
    # hold the stream again: free versions in stream time. Paced replays retrain by pairs only.
    distiller = {"poll_seconds": 2.0, "retrain_after_pairs": 500,
                 "retrain_after_minutes": PACED_RETRAIN_MINUTES if paced else 2.0, **(distiller or {})}
    stack = replay_stack(stream_path, workdir, teacher_model=teacher_model, port=port, distiller=distiller,
                         admin_key=admin_key, route_settings=route_settings or {},
                         routes=sorted({str(r["route"]) for r in rows if r.get("route")}))
    t0 = time.monotonic()
    pacer = None
    try:
        stack.start()
        pacer = Pacer(stack.db, distiller, wait_for_finetune=paced != "heads").start() if paced else None
        sent = send_stream(rows, stack.base_url, model=teacher_model, rate=rate, concurrency=concurrency, progress=progress,
                           pacer=pacer, route_header="route")
    except BaseException:
        stack.stop()
        raise
    finally:
        if pacer is not None:
            pacer.stop()
    elapsed = time.monotonic() - t0
    if not keep_running:
        stack.stop()
    else:
        import urllib.request

        time.sleep(0.5)  # one ledger flush window
        urllib.request.urlopen(f"{stack.url}/healthz").read()
    from store import Ledger

    ledger = Ledger(stack.db)
    deadline = time.monotonic() + 30
    uids = [s["uid"] for s in sent]
    while True:  # a running gateway writes within its flush window
        found = ledger.count_exchanges(None, endpoint="chat.completions", status=200)
        if found >= len(uids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    route_names = sorted({s.get("route") or "replay" for s in sent})
    by_uid = {r["uid"]: r for route in route_names for r in ledger.exchange_rows(
        route, columns=("uid", "cost_usd", "counterfactual_usd", "confidence", "student_answer", "served_by"))}
    latency = {}
    for who in ("student", "teacher"):
        vals = sorted(r["latency_ms"] for route in route_names
                      for r in ledger.exchange_rows(route, columns=("latency_ms",), served_by=who, status=200))
        latency[f"{who}_p50_ms"] = round(vals[len(vals) // 2], 2) if vals else None
        latency[f"{who}_p95_ms"] = round(vals[int(len(vals) * 0.95)], 2) if vals else None
    target = float((route_settings or {}).get("target_agreement", 0.98))
    cache_dir = Path("bench/results") if results_dir is None else results_dir
    sent_of = {route: [i for i, s_ in enumerate(sent) if (s_.get("route") or "replay") == route] for route in route_names}
    # each route's own stream (one stream: all of it)
    rows_of = {route: rows if len(route_names) == 1 else [rows[i] for i in sent_of[route]] for route in route_names}

    def route_ceiling(route: str) -> float | None:
        """``--ceiling auto`` over several tasks: the ceiling of the route's own stream (one student
        family spans one task)."""
        if ceiling is not True:
            return None
        path = workdir / f"stream-{route}.jsonl"
        write_stream(path, rows_of[route])
        return ceiling_share(path, rows_of[route], target, cache_dir=cache_dir, progress=progress)["share"]

    if len(route_names) == 1:
        share = None
        if ceiling is True:
            share = ceiling_share(stream_path, rows, target, cache_dir=cache_dir, progress=progress)["share"]
        elif ceiling:
            share = float(ceiling)
        metrics = replay_metrics(rows[:len(sent)], sent, by_uid, ceiling=share, target=target)
    else:  # several tasks: the ceiling (and ceiling_ratio) is each route's
        metrics = replay_metrics(rows[:len(sent)], sent, by_uid, target=target)
        metrics["routes"] = {}
        for route in route_names:
            idx = sent_of[route]
            part = replay_metrics(rows_of[route], [sent[i] for i in idx], by_uid, ceiling=route_ceiling(route),
                                  target=target)
            part.pop("sweep", None)
            part["student_versions"] = version_summaries(ledger, route)
            metrics["routes"][route] = part
    if pacer is not None:
        metrics["paced"] = {"held_s": round(pacer.held_s, 1), "holds": pacer.holds}

    def metrics_of(route: str) -> dict[str, Any]:
        """Where a route's own figures go: its entry under ``routes`` with several, the top level with one."""
        return metrics["routes"][route] if "routes" in metrics else metrics

    for route in route_names:
        live = ledger.live_student(route)
        if live and not keep_running:  # with the stack stopped, the machine is quiet
            metrics_of(route)["router_decision_ms"] = time_decisions(live["artifact_path"], live["checksum"], rows_of[route])
    if score_versions_on_last_quarter:
        scored = version_scores_by_route(ledger, rows_of, target, progress=progress,
                                         confidence=(route_settings or {}).get("target_confidence"))
        for route, scores in scored.items():
            metrics_of(route)["version_scores"] = scores
    metrics.update({
        "dataset": name, "requests": len(rows), "lost": len([u for u in uids if u not in by_uid]),
        "elapsed_s": round(elapsed, 1), "rate_rps": rate, "concurrency": concurrency,
        "pacing": pacing_text(paced, rate),
        "route_settings": route_settings or {},
        "distiller": distiller,
        "teacher": f"stand-in replay teacher priced as {teacher_model}",
        "latency_in_gateway": latency,
        "student_versions": version_summaries(ledger, route_names[0]) if len(route_names) == 1 else [],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    saved = write_results(metrics, f"replay-{name}", out, results_dir)
    plot(metrics, saved.with_suffix(".png"), f"kdgate replay: {name} ({len(rows)} requests, stand-in teacher)")
    return metrics, (stack if keep_running else None)


def write_stream(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as a stream file (``{messages, answer}`` per line): what the stand-in teacher replays
    and the ceiling trains on."""
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps({"messages": r["messages"], "answer": r["answer"]}) + "\n")


def version_summaries(ledger: Any, route: str) -> list[dict[str, Any]]:
    """The route's registered versions, oldest first: version, status, train pairs, coverage at target."""
    return [{"version": v["version"], "status": v["status"], "train_pairs": v["train_pairs"],
             "coverage_at_target": v["metrics"].get("coverage_at_target")}
            for v in reversed(ledger.student_versions(route))]


def score_versions(
    ledger: Any, route: str, rows: list[dict[str, Any]], target: float, *, limit: int = 1000, progress: bool = False,
    confidence: float | None = None,
) -> list[dict[str, Any]]:
    """Every registered version of ``route`` (label, structured, LM), scored on ``rows``' own answers.

    A replay knows what the teacher would have said to every request, which production never does:
    this says whether the promotion gate kept a better version out. Per version: its agreement, the
    coverage at ``target`` on these answers (the best any threshold could do), and what it would
    serve at the threshold its own validation curve gives (what the router would do with it).
    ``trained_through`` is the newest exchange id it trained on; a version whose data reaches into
    ``rows`` has seen some of their escalations. At most ``limit`` rows, evenly spaced.
    """
    import numpy as np
    from tqdm import tqdm

    from router.agreement import answers_agree
    from router.curve import coverage_at, coverage_curve, point_at
    from router.policy import effective_threshold
    from router.student import answer_all, load_student

    step = max(1, len(rows) // limit)
    sample = rows[::step][:limit]
    out = []
    from store import registry

    versions = list(reversed(registry.list_students(ledger, route)))
    for v in tqdm(versions, desc="scoring versions", unit="version", disable=not progress):
        try:
            student = load_student(v["artifact_path"], expected_checksum=v["checksum"])
        except Exception as exc:  # a broken artifact is part of the story, not a crash of the report
            out.append({"version": v["version"], "status": v["status"], "error": str(exc)})
            continue
        try:
            outputs = answer_all(student, [r["messages"] for r in sample])
        finally:
            student.close()
        # a request the student declines (too long, unfinished) would escalate: confidence 0, no agreement
        conf = np.array([o.confidence if o is not None else 0.0 for o in outputs], dtype=np.float64)
        kind = stream_answer_kind(rows)
        correct = np.array([o is not None and answers_agree(kind, o.text, r["answer"]) for o, r in zip(outputs, sample)],
                           dtype=np.float64)
        curve = coverage_curve(conf, correct, max_points=None)
        own = effective_threshold({"target_agreement": target, "target_confidence": confidence}, v["curve"] or [])
        served = point_at(curve, own)
        out.append({
            "version": v["version"], "status": v["status"], "train_pairs": v["train_pairs"],
            "trained_through": v["metrics"].get("last_exchange_id"),
            "agreement": round(float(correct.mean()), 4),
            "coverage_at_target": round(coverage_at(curve, target), 4),
            "served_at_own_threshold": round(served["coverage"], 4) if served else 0.0,
            "agreement_when_served": round(served["agreement"], 4) if served else None,
            "requests": len(sample),
        })
    return out


def version_scores_by_route(
    ledger: Any, rows_of: dict[str, list[dict[str, Any]]], target: float, *, progress: bool = False,
    confidence: float | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``--score-versions``: each route's versions scored on the last quarter of that route's own
    stream (:func:`score_versions`); a route is one task, so no version is scored on another's answers."""
    return {route: score_versions(ledger, route, route_rows[len(route_rows) * 3 // 4:], target, progress=progress,
                                  confidence=confidence)
            for route, route_rows in rows_of.items()}


def time_decisions(artifact_path: str, checksum: str, rows: list[dict[str, Any]], n: int = 400) -> dict[str, Any]:
    """The router's own decision, one request at a time: the live student's features (template
    strip, embedding, TF-IDF) and calibrated confidence, timed in this process on the stream's last
    ``n`` requests after a warm-up. This is what a request pays before the student-or-teacher choice.
    For a label student both encoder runtimes are timed, in alternating blocks of 25 requests
    (``by_runtime``); ``p50``/``p95`` are the runtime the gateway serves with by default."""
    from router import embedding
    from router.student import load_student

    before = embedding._runtime
    student = load_student(artifact_path, expected_checksum=checksum)
    encoder = getattr(student, "embedder", None)
    runtimes = ["torch"]
    if isinstance(encoder, embedding.Embedder):
        served = embedding.prepare_serving_process("auto")
        runtimes = sorted({"torch", served})
    else:
        served, n = "torch", min(n, 100)  # an LM student: one decode per request
    sample = rows[-n:]
    times: dict[str, list[float]] = {r: [] for r in runtimes}
    try:
        for runtime in runtimes:
            embedding._runtime = runtime
            for r in sample[:20]:
                student.predict(r["messages"], {})
        for start in range(0, len(sample), 25):
            for runtime in runtimes:
                embedding._runtime = runtime
                for r in sample[start:start + 25]:
                    t0 = time.perf_counter()
                    student.predict(r["messages"], {})
                    times[runtime].append((time.perf_counter() - t0) * 1000)
    finally:
        embedding._runtime = before
        student.close()

    def pcts(vals: list[float]) -> dict[str, float]:
        vals = sorted(vals)
        return {"p50": round(vals[len(vals) // 2], 2), "p95": round(vals[int(len(vals) * 0.95)], 2)}

    out: dict[str, Any] = {**pcts(times[served]), "requests": len(sample), "runtime": served}
    if len(runtimes) > 1:
        out["by_runtime"] = {r: pcts(v) for r, v in times.items()}
    return out


def pacing_text(paced: bool | str, rate: float) -> str:
    """How a replay's stream was paced, in words (the table and the JSON say it)."""
    if paced == "heads":
        return (f"paced: {rate:g} requests/s, held while the distiller retrains the student's heads "
                "(encoder fine-tuning runs beside the stream; retrains by pairs only)")
    if paced:
        return f"paced: {rate:g} requests/s, held while the distiller trains (held time not counted; retrains by pairs only)"
    return f"unpaced: {rate:g} requests/s while the distiller trains beside the stream"


def format_table(m: dict[str, Any]) -> str:
    """A replay's results as the terminal shows them: saving and agreement, baselines, versions."""
    from gateway.money import format_usd

    lines = [f"\n{'':<22}{'student share':>14}{'agreement':>11}{'saved':>8}"]
    for label, key in (("whole stream", "overall"), ("last 25%", "last_quarter")):
        b = m[key]
        lines.append(f"{label:<22}{b['student_share']:>14.1%}{b['agreement']:>11.2%}{b['saved_fraction']:>8.1%}")
    for label, b in m["baselines"].items():
        lines.append(f"{label:<22}{b['student_share']:>14.1%}{b['agreement']:>11.2%}{b['saved_fraction']:>8.1%}")
    o = m["overall"]
    if m.get("pacing"):
        lines.append(f"\npacing: {m['pacing']}" + (f" (held {m['paced']['held_s']:.0f} s in {m['paced']['holds']} holds)"
                                                   if m.get("paced") else ""))
    if m.get("first_cascade_request"):
        lines.append(f"first student answer at request {m['first_cascade_request']:,} after "
                     f"{m['teacher_pairs_before_cascade']:,} teacher answers; lowest agreement over "
                     f"{WINDOW:,} requests after it {m['min_window_agreement']:.2%}")
    else:
        lines.append("the student never answered")
    if m.get("ceiling_ratio") is not None:
        lines.append(f"last quarter at the target / ceiling ({m['ceiling_share']:.1%}): {m['ceiling_ratio']:.3f}")
    for route, r in (m.get("routes") or {}).items():
        lines.append(f"  route {route}: {r['overall']['requests']:,} requests, {r['overall']['student_share']:.1%} served, "
                     f"{r['overall']['saved_fraction']:.1%} saved, agreement {r['overall']['agreement']:.2%}; last 25% "
                     f"{r['last_quarter']['student_share']:.1%} served at {r['last_quarter']['agreement']:.2%}; "
                     + (f"first student answer at request {r['first_cascade_request']:,} of the route"
                        if r.get("first_cascade_request") else "the student never answered")
                     + (f"; ceiling ratio {r['ceiling_ratio']:.3f}" if r.get("ceiling_ratio") is not None else ""))
    if m.get("router_decision_ms"):
        d = m["router_decision_ms"]
        lines.append(f"router decision (features + calibrated score, one request, encoder on {d.get('runtime', 'torch')}): "
                     f"p50 {d['p50']:.1f} ms, p95 {d['p95']:.1f} ms")
        for runtime, t in sorted((d.get("by_runtime") or {}).items()):
            lines.append(f"  encoder on {runtime}: p50 {t['p50']:.1f} ms, p95 {t['p95']:.1f} ms (same requests, alternating blocks)")
    lines.append(f"\nteacher spend without kdgate ${format_usd(o['teacher_spend_usd'])}, with kdgate ${format_usd(o['actual_spend_usd'])}"
                 f"  (APGR {m['apgr']:.3f}; CPT50/80/95 {m['cpt']['50']:.1%}/{m['cpt']['80']:.1%}/{m['cpt']['95']:.1%})")
    if m.get("version_scores"):
        lines.append("\nevery version on the last quarter's answers (coverage at target: the best any threshold could do;"
                     " served: at its own threshold)")
        lines.append(f"{'version':>8}{'status':>11}{'pairs':>7}{'agreement':>11}{'cov@target':>12}{'served':>8}{'agree':>8}")
        for v in m["version_scores"]:
            if "error" in v:
                lines.append(f"{v['version']:>8}{v['status']:>11}  {v['error']}")
                continue
            agree = "-" if v["agreement_when_served"] is None else f"{v['agreement_when_served']:.1%}"
            lines.append(f"{v['version']:>8}{v['status']:>11}{v['train_pairs']:>7}{v['agreement']:>11.1%}"
                         f"{v['coverage_at_target']:>12.1%}{v['served_at_own_threshold']:>8.1%}{agree:>8}")
    return "\n".join(lines)


def distiller_overrides(text: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--config-json`` (and ``extra``, settings given by their own flags, which win): distiller
    settings for the replayed gateway, checked before anything starts by the distiller itself (its
    worker's ``--check-config``, in a process of its own, as the gateway runs it): an unknown key would
    otherwise stop the distiller after the replay began, and the run would measure a teacher-only
    gateway. Raises ValueError naming what is wrong."""
    if not text and not extra:
        return {}
    try:
        overrides = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"--config-json is not JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("--config-json must be a JSON object")
    overrides.update(extra or {})
    check = subprocess.run([sys.executable, "-m", "distiller.worker", "--check-config", "--config-json", json.dumps(overrides)],
                           env=child_env(), capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        raise ValueError(check.stderr.strip() or f"distiller settings refused (exit {check.returncode})")
    return overrides
