"""``kdgate bench lm-curve``: an LM student on a real pretrained base, as a route's data grows.

For each N the distiller's own LM student is trained on the first N pairs of TRAIN (its newest fifth
held back for validation and calibration, as in production) and scored on every pair of TEST:

- ``exact_agreement``: answers equal to the teacher's (:func:`router.agreement.answers_agree`: parsed
  JSON for a JSON route, normalised text otherwise);
- ``coverage``: the share of TEST served at each target agreement with the best threshold for TEST
  itself (the most any threshold could serve, as ``bench learning-curve`` reports it), and
  ``served_at_val_threshold``: what the threshold chosen on validation serves on TEST, and at what
  agreement (what the router would do);
- ``train_seconds`` (the training loop; loading and validation decoding not counted) and ``p50_ms``:
  one request at a time through the loaded student, template stripping to calibrated confidence,
  on the first ``latency_requests`` TEST requests, with ``threads`` torch threads.

The student kind is the distiller's choice: a JSON extraction stream whose answers the answer grammar
expresses gets the structured student (:mod:`distiller.lm.structured`), anything else the free-text
one (:mod:`distiller.lm.train`). Any stream of ``{"messages", "answer"}`` lines works.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from distiller.dataset import examples_from_jsonl
from distiller.lm.structured import StructuredConfig, confidences, eligible, score, train_structured_student
from router.agreement import answers_agree
from router.curve import coverage_at, coverage_curve

log = logging.getLogger(__name__)

__all__ = ["run_lm_curve", "format_table", "write_results"]

TARGETS = (0.95, 0.98)


def _served(confidence: np.ndarray, agree: np.ndarray, threshold: float | None) -> dict[str, float | None]:
    served = confidence >= threshold if threshold is not None else np.zeros(len(confidence), bool)
    return {"threshold": threshold, "coverage": float(served.mean()),
            "agreement": float(agree[served].mean()) if served.any() else None}


def _val_threshold(curve: Sequence[dict[str, float]], target: float) -> float | None:
    """The threshold the validation curve gives for ``target`` (its plain curve), None if none reaches it."""
    from router.curve import threshold_for_target

    return threshold_for_target(curve, target)


def _load() -> float | None:
    """The machine's 1-minute load average (a shared CPU makes every timing here pessimistic)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _latency(predict: Any, messages: Sequence[Any]) -> tuple[float, float]:
    for m in messages[:3]:  # warm up
        predict(m)
    ms = []
    for m in messages:
        t0 = time.perf_counter()
        predict(m)
        ms.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ms)), float(np.percentile(ms, 95))


def _structured_point(train: Sequence[Any], val: Sequence[Any], test: Sequence[Any], cfg: StructuredConfig,
                      template: Any, schema: Any, targets: Sequence[float], latency_requests: int, work: Path) -> dict[str, Any]:
    from router.artifact import write_manifest
    from router.student import StudentError, load_student

    run = train_structured_student(
        [template.strip(e.messages) for e in train], [e.answer for e in train],
        [template.strip(e.messages) for e in val], [e.answer for e in val],
        cfg, work, route="bench", version=1, template=template, target=max(targets), schema=schema)
    scored = score(run.model, [template.strip(e.messages) for e in test], [e.answer for e in test],
                   batch_size=cfg.eval_batch_size, progress=cfg.progress, desc="test")
    confidence = confidences(run.model.calibrator, scored)  # the calibrator fitted on validation
    curve = coverage_curve(confidence, scored.agree.astype(float), max_points=None)
    from distiller.lm.evaluate import auroc

    write_manifest(work, run.manifest)
    student = load_student(work)

    def predict(messages: Any) -> None:
        try:
            student.predict(messages, {})
        except StudentError:
            pass  # an escalation costs its decode all the same

    try:
        p50, p95 = _latency(predict, [e.messages for e in test[:latency_requests]])
    finally:
        student.close()
    m = run.metrics
    return {
        "kind": "lm_structured",
        "exact_agreement": float(scored.agree.mean()),
        "coverage": {f"{t:g}": coverage_at(curve, t) for t in targets},
        "served_at_val_threshold": {f"{t:g}": _served(confidence, scored.agree, _val_threshold(run.curve, t))
                                    for t in targets},
        "auroc": auroc(confidence, scored.agree),
        "complete": float(scored.complete.mean()),
        "train_seconds": m["train_seconds"],
        "p50_ms": round(p50, 1),
        "p95_ms": round(p95, 1),
        "passes_mean": float(np.mean(scored.passes)),
        "val_agreement": m["agreement"],
        "val_coverage_at_target": m["coverage_at_target"],
        "train_pairs": m["train_pairs"],
        "val_pairs": len(val),
        "schema_coverage": m["schema_coverage"],
        "train_epochs": m["train_epochs"],
        "train_steps": m["train_steps"],
        "tokens_per_second": m["tokens_per_second"],
        "budget_limited": m["budget_limited"],
        "device": m["device"],
        "train_dtype": m["train_dtype"],
        "epoch_checks": m["epoch_checks"],
        "kept_step": m["kept_step"],
        "stopped_early": m["stopped_early"],
        "decoder": m["decoder"],
        "decoder_weights": m["decoder_weights"],
        "decoder_packed": m["decoder_packed"],
    }


def _free_text_point(train: Sequence[Any], val: Sequence[Any], test: Sequence[Any], base_model: str,
                     overrides: dict[str, Any], targets: Sequence[float], latency_requests: int, work: Path,
                     progress: bool) -> dict[str, Any]:
    """The free-text LM student (what the distiller trains for a route the grammar does not cover)."""
    from distiller.lm import evaluate
    from distiller.lm.config import LMTrainConfig
    from distiller.lm.data import build_examples
    from distiller.lm.train import torch_threads, train_lm
    from router.lm_base import resolve_base
    from router.lm_student import LMEngine, confidence_for
    from transformers import AutoTokenizer

    cfg = LMTrainConfig.from_dict({"base_model": base_model, "progress": progress, **overrides}, preset_name="lora-small")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base_model).path)
    pairs = [SimpleNamespace(messages=e.messages, answer=e.answer, teacher_logprobs=e.logprobs) for e in train]
    examples, _ = build_examples(tokenizer, pairs, max_seq_len=cfg.max_seq_len, use_teacher_logprobs=True)
    with torch_threads(cfg.torch_threads):
        result = train_lm(cfg, examples, work)
        report = evaluate.evaluate_student(result.model, result.tokenizer, val, cfg, target=max(targets), device=result.device)
        engine = LMEngine(result.model, result.tokenizer, device=result.device)
        gens = evaluate.generate_answers(engine, [e.messages for e in test], max_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.eval_batch_size)
        kind = evaluate.answer_format([e.answer for e in train])
        agree = np.array([answers_agree(kind, g.text, e.answer) for g, e in zip(gens, test)])
        confidence, _ = confidence_for(report.calibrator, [g.token_logprobs for g in gens], [e.messages for e in test])

        def predict(messages: Any) -> None:
            gen = engine.generate([messages], max_tokens=cfg.max_new_tokens)
            confidence_for(report.calibrator, [gen[0].token_logprobs], [messages])

        p50, p95 = _latency(predict, [e.messages for e in test[:latency_requests]])
    curve = coverage_curve(confidence, agree.astype(float), max_points=None)
    return {
        "kind": "lm",
        "exact_agreement": float(agree.mean()),
        "coverage": {f"{t:g}": coverage_at(curve, t) for t in targets},
        "served_at_val_threshold": {f"{t:g}": _served(confidence, agree, _val_threshold(report.curve, t))
                                    for t in targets},
        "auroc": evaluate.auroc(confidence, agree),
        "train_seconds": round(result.seconds, 2),
        "p50_ms": round(p50, 1),
        "p95_ms": round(p95, 1),
        "val_agreement": report.metrics["agreement"],
        "train_pairs": len(examples),
        "val_pairs": len(val),
        "device": result.device,
    }


def run_lm_curve(
    train_path: str | Path,
    test_path: str | Path,
    *,
    base_model: str,
    sizes: Sequence[int] = (500, 2000),
    targets: Sequence[float] = TARGETS,
    overrides: dict[str, Any] | None = None,
    threads: int | None = 1,
    latency_requests: int = 150,
    progress: bool = True,
    keep_artifacts: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the results document (see the module docstring):
    ``{"base_model", "points": [{"n", "exact_agreement", "coverage": {"0.95", "0.98"}, "train_seconds",
    "p50_ms", ...}], ...}``."""
    import torch

    from router.lm_base import resolve_base
    from router.template import learn_template

    stream = examples_from_jsonl(train_path)
    test = examples_from_jsonl(test_path)
    base = resolve_base(base_model)  # converted before any clock starts
    cfg = StructuredConfig.from_dict({"base_model": base_model, "progress": progress, "threads": threads,
                                      **(overrides or {})})
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    points = []
    try:
        for n in sizes:
            if n > len(stream):
                points.append({"n": n, "error": f"the stream has only {len(stream)} pairs"})
                continue
            pairs = stream[:n]
            n_val = min(max(cfg.min_val_pairs, int(round(n * cfg.val_fraction))), cfg.max_val_pairs, n - 1)
            train, val = pairs[:-n_val], pairs[-n_val:]
            template = learn_template([e.messages for e in train])
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base.path)
            schema, why = eligible(tokenizer, [template.strip(e.messages) for e in train], [e.answer for e in train],
                                   min_coverage=cfg.min_coverage, max_enum=cfg.max_enum, order=cfg.answer_order)
            log.info("n=%d: %s", n, why)
            work = Path(tempfile.mkdtemp(prefix=f"kdgate-lm-curve-{n}-"))
            started, load_before = time.monotonic(), _load()
            try:
                if schema is not None:
                    point = _structured_point(train, val, test, cfg, template, schema, targets, latency_requests, work)
                else:
                    point = _free_text_point(train, val, test, base_model, dict(overrides or {}), targets,
                                             latency_requests, work, progress)
            finally:
                if keep_artifacts and work.exists():  # to re-score or serve a point later
                    dest = Path(keep_artifacts) / f"n{n}"
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(work), str(dest))
                shutil.rmtree(work, ignore_errors=True)
            point = {"n": n, **point, "grammar": why, "wall_seconds": round(time.monotonic() - started, 1),
                     "load_average": {"before": load_before, "after": _load()}}
            log.info("n=%d exact agreement %.3f coverage %s train %.0f s p50 %.0f ms", n, point["exact_agreement"],
                     point["coverage"], point["train_seconds"], point["p50_ms"])
            points.append(point)
    finally:
        torch.set_num_threads(before)
    return {
        "base_model": base_model,
        "base_sha256": base.sha256,
        "dataset": {"train": str(train_path), "test": str(test_path)},
        "stream_pairs": len(stream),
        "test_pairs": len(test),
        "targets": [float(t) for t in targets],
        "threads": threads,
        "cpu": cpu_info(),
        "config": cfg.to_dict(),
        "points": points,
    }


def cpu_info() -> dict[str, Any]:
    """What the figures depend on: torch's CPU kernel level (``AVX2``, ``AVX512``, ...), whether the CPU
    has bf16 kernels (without them training and decoding run in float32, and slower), whether the
    decoder's float32 layers are packed for oneDNN, and the cores."""
    import torch

    from router.lm_decode import bf16_packing_available, fp32_packing_available

    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16_kernels": bf16_packing_available(),
            "fp32_packing": fp32_packing_available(), "cores": os.cpu_count()}


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    keys = [f"{t:g}" for t in result["targets"]]
    lines = [
        f"lm-curve: {result['base_model']} on {result['dataset']['train']} -> {result['dataset']['test']} "
        f"({result['test_pairs']} test pairs, {result['threads']} thread(s)"
        + (f", CPU {result['cpu']['capability']}{'' if result['cpu']['bf16_kernels'] else ' without bf16 kernels'}"
           if result.get("cpu") else "") + ")",
        "",
        "| N | kind | exact agreement | " + " | ".join(f"cov@{float(k) * 100:g} (val thr: served / agreement)" for k in keys)
        + " | train s | epochs | p50 / p95 ms |",
        "| ---: | --- | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | ---: | ---: |",
    ]
    for p in result["points"]:
        if "error" in p:
            lines.append(f"| {p['n']} | - | {p['error']} |" + " |" * (len(keys) + 3))
            continue
        cells = []
        for k in keys:
            s = p["served_at_val_threshold"][k]
            agree = f"{s['agreement']:.1%}" if s["agreement"] is not None else "-"
            cells.append(f"{p['coverage'][k]:.1%} ({s['coverage']:.1%} / {agree})")
        lines.append(f"| {p['n']} | {p['kind']} | {p['exact_agreement']:.1%} | " + " | ".join(cells)
                     + f" | {p['train_seconds']:.0f} | {_epochs(p)} | {p['p50_ms']:.0f} / {p['p95_ms']:.0f} |")
    return "\n".join(lines)


def _epochs(point: dict[str, Any]) -> str:
    """The epochs trained, and the one whose weights were kept where the held-out check chose another."""
    trained = point.get("train_epochs")
    checks = point.get("epoch_checks") or []
    kept = next((c["epoch"] for c in checks if c["step"] == point.get("kept_step")), None)
    if trained is None:
        return "-"
    return f"{trained:g}" if kept is None or kept == trained else f"{trained:g} (kept {kept:g})"


def write_results(result: dict[str, Any], out: Path, table: Any = None) -> Path:
    """Write the JSON to ``out`` and the table beside it (same name, ``.md``; ``table``: the function
    that formats it, :func:`format_table` unless another bench passes its own)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text((table or format_table)(result) + "\n")
    return out
