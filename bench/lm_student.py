"""``kdgate bench lm-student``: the synthetic free-text route distilled end to end.

Steps: (1) build the tiny base model, (2) seed a ledger with the synthetic route's teacher pairs,
(3) distil the route (train, evaluate, calibrate, register, promote), (4) measure exact agreement on a
held-out set and the confidence's AUROC on held-out plus out-of-distribution prompts (names never seen
in training, which the student gets wrong), (5) serve the promoted student through the real gateway (``kdgate serve`` in its own process, a
stand-in replay teacher behind it) and time requests sent with the official ``openai`` client.
If the gateway cannot be started, step 5 falls back to timing ``Student.predict`` directly and says so
in ``student_latency_path``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import synthetic
from distiller.lm.config import LMTrainConfig, preset

__all__ = ["run_lm_student_bench", "measure_predict_latency", "measure_gateway_latency"]

log = logging.getLogger(__name__)

ROUTE = "orders-confirm"


def measure_predict_latency(student: Any, items: list[synthetic.SyntheticExample]) -> list[float]:
    """Milliseconds per sequential ``student.predict`` call (the student alone, no HTTP)."""
    out = []
    for ex in items:
        t0 = time.perf_counter()
        student.predict(ex.messages, {"max_tokens": 32, "temperature": 0})
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure_gateway_latency(ledger_path: Path, items: list[synthetic.SyntheticExample], *,
                            torch_threads: int | None = None) -> dict[str, Any]:
    """Serve the ledger's live student through ``kdgate serve`` (a child process, as in production,
    the stand-in teacher beside it) and time requests from the openai client.

    Returns ``{"latencies_ms": [...] of student-served requests, "served_by_student": n, "requests": n}``
    (who served each request is read from the gateway's ``x-kdgate-served-by`` header). The stand-in
    answers these requests as the synthetic route's teacher would; ``torch_threads`` is the gateway's
    torch thread count (the student's training preset's, so that serving matches evaluation).
    """
    import openai

    from bench.stack import Stack

    workdir = Path(ledger_path).parent / "gateway"
    workdir.mkdir(parents=True, exist_ok=True)
    answers = workdir / "teacher.jsonl"
    answers.write_text("".join(json.dumps({"messages": ex.messages, "answer": ex.answer}) + "\n" for ex in items))
    settings = {
        "db": str(ledger_path), "teacher_api_key": "sk-bench-standin-" + "x" * 20, "embedded_distiller": False,
        "log_level": "warning", "routes": {ROUTE: {"aliases": [ROUTE], "mode": "cascade", "threshold": 0.0}},
    }
    env = {"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else None
    with Stack(workdir, settings=settings, dataset=answers, env=env) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
        # the gateway loads live students in the background: wait until the student answers
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            raw = client.chat.completions.with_raw_response.create(
                model=ROUTE, messages=items[0].messages, max_tokens=32, temperature=0
            )
            if raw.headers.get("x-kdgate-served-by") == "student":
                break
            time.sleep(0.25)
        timings: list[tuple[str, float]] = []  # (served by, milliseconds)
        deadline = time.monotonic() + 120
        for ex in items:
            t0 = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=ROUTE, messages=ex.messages, max_tokens=32, temperature=0
            )
            raw.parse()
            timings.append((raw.headers.get("x-kdgate-served-by", ""), (time.perf_counter() - t0) * 1000))
            if time.monotonic() > deadline:
                break
    student_ms = [ms for served_by, ms in timings if served_by == "student"]
    return {"latencies_ms": student_ms, "served_by_student": len(student_ms), "requests": len(timings)}


def run_lm_student_bench(
    out: Path,
    *,
    train_examples: int = 960,
    test_examples: int = 200,
    ood_examples: int = 50,
    latency_requests: int = 30,
    config: LMTrainConfig | None = None,
    work_dir: Path | None = None,
    through_gateway: bool = True,
) -> dict[str, Any]:
    """Run the synthetic LM-student bench; writes and returns
    ``{"exact_agreement", "auroc", "train_seconds", "student_p50_ms", ...details}``."""
    from bench.tiny import build_tiny_model
    from distiller.lm.evaluate import auroc, normalize
    from distiller.lm.train import distill_lm_route, torch_threads
    from router.student import load_student
    from store import Ledger

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="kdgate-bench-lm-") if work_dir is None else None
    work = Path(tmp.name) if tmp is not None else Path(work_dir)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    try:
        # (1) the base model: tokenizer trained on the route's text, random weights
        train = synthetic.examples(train_examples, seed=0)
        corpus = [f"{synthetic.SYSTEM_PROMPT} {ex.messages[-1]['content']} {ex.answer}" for ex in train]
        base = build_tiny_model(work / "base", corpus)
        # (2) the ledger, as the gateway would have logged the teacher's traffic
        ledger_path = work / "ledger.db"
        ledger = Ledger(ledger_path)
        ledger.upsert_route(ROUTE, teacher_model="synthetic/teacher", settings={"target_agreement": 0.98})
        synthetic.seed_ledger(ledger, ROUTE, train)
        # (3) distil
        cfg = dataclasses.replace(config or preset("tiny-cpu"), base_model=str(base))
        summary = distill_lm_route(ledger_path, ROUTE, cfg, artifacts_dir=work / "artifacts", work_dir=work / "train")
        # (4) held-out agreement and AUROC, through the runtime the gateway uses
        # (serving uses the same torch thread count as training: one, for the tiny model)
        with torch_threads(cfg.torch_threads):
            student = load_student(summary["artifact_path"], expected_checksum=summary["checksum"])
            try:
                held_out = synthetic.examples(test_examples, seed=12345)
                ood = synthetic.out_of_distribution(ood_examples, seed=7)
                outs = _predict_all(student, held_out + ood)
                right = np.array([normalize(o.text) == normalize(ex.answer) for o, ex in zip(outs, held_out + ood)])
                conf = np.array([o.confidence for o in outs])
                exact = float(right[: len(held_out)].mean())
                area = auroc(conf, right)
                direct_ms = measure_predict_latency(student, held_out[:latency_requests])
            finally:
                student.close()
            # (5) latency through the gateway (falls back to the direct measurement)
            path, gateway_info = "direct-predict", None
            latencies = direct_ms
            if through_gateway:
                try:
                    gateway_info = measure_gateway_latency(ledger_path, held_out[:latency_requests],
                                                           torch_threads=cfg.torch_threads)
                    if gateway_info["latencies_ms"]:
                        latencies, path = gateway_info["latencies_ms"], "gateway-openai-client"
                except Exception as exc:  # noqa: BLE001 - the bench still reports the direct figure
                    log.warning("gateway latency measurement failed (%s); reporting direct predict latency", exc)
                    gateway_info = {"error": str(exc)[:300]}
        result = {
            "exact_agreement": exact,
            "auroc": area,
            "train_seconds": round(float(summary["train_seconds"]), 2),
            "student_p50_ms": round(statistics.median(latencies), 2),
            "student_latency_path": path,
            "direct_predict_p50_ms": round(statistics.median(direct_ms), 2),
            "gateway": gateway_info and {k: v for k, v in gateway_info.items() if k != "latencies_ms"},
            "ood_exact_agreement": float(right[len(held_out) :].mean()) if ood_examples else None,
            "held_out": test_examples,
            "ood": ood_examples,
            "validation_metrics": summary["metrics"],
            "status": summary["status"],
            "distillation": summary["distillation"],
            "device": summary["metrics"].get("device"),
            "teacher": "synthetic templated rewrite (stand-in teacher for the gateway step)",
            "total_seconds": round(time.perf_counter() - t_start, 2),
        }
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _predict_all(student: Any, items: list[synthetic.SyntheticExample]) -> list[Any]:
    # concurrent calls: the embedded student batches them into few generate() calls
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda ex: student.predict(ex.messages, {"max_tokens": 32, "temperature": 0}), items))
