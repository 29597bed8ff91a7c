"""``kdgate bench learning-curve``: how much traffic a student covers as a route's data grows.

For each N (250, 500, 1k, 2k, 5k, 10k by default) the student is trained exactly as the distiller
trains it, on the first N pairs of a request stream (its own time split for validation and
calibration), then scored on the held-back rest: agreement with the teacher overall and the share of
requests it covers at 95/98/99% agreement (or the ``targets`` asked for), plus the time training took.
Coverage at a target uses the best threshold for the held-back pairs themselves: it is the most any
threshold could serve at that agreement with this student, a ceiling for what the router can reach
(``served_at_val_threshold`` is what the threshold chosen on validation actually serves).

Held-back rest: the pairs after the largest N that fits, if at least ``min_test`` remain; otherwise
(a short stream) a fixed tail of the stream, and sizes that overlap it are skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from distiller.config import DistillerConfig
from distiller.dataset import Example, NotEnoughData, build_dataset, examples_from_jsonl
from distiller.evaluate import agreement_vector
from distiller.train import UnsupportedRoute, train_candidate
from router.curve import coverage_at, coverage_curve

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIZES", "check_targets", "split_stream", "run_learning_curve", "format_table", "write_results"]

DEFAULT_SIZES = (250, 500, 1000, 2000, 5000, 10000)
TARGETS = (0.95, 0.98, 0.99)


def check_targets(targets: Sequence[float]) -> list[float]:
    """The agreements to report coverage at, sorted and deduplicated; ValueError unless each is in (0, 1]."""
    out = sorted({float(t) for t in targets})
    if not out or not all(0.0 < t <= 1.0 for t in out):
        raise ValueError(f"targets must be agreements in (0, 1], got {list(targets)}")
    return out


def split_stream(
    stream: Sequence[Example], sizes: Sequence[int], *, min_test: int = 500, tail_fraction: float = 0.2
) -> tuple[list[int], list[Example]]:
    """The sizes that can be trained and the held-back test pairs (see the module docstring)."""
    n = len(stream)
    fits = sorted(s for s in sizes if s < n)
    if fits and n - fits[-1] >= min(min_test, n // 2):
        return fits, list(stream[fits[-1] :])
    tail = max(min(min_test, n // 2), int(n * tail_fraction))
    return [s for s in fits if s <= n - tail], list(stream[n - tail :])


class EmbedCache:
    """Frozen-encoder embeddings by text: a stream's texts are embedded once across all sizes."""

    def __init__(self, embedder: Any, batch_size: int):
        self.embedder = embedder
        self.batch_size = batch_size
        self.vectors: dict[str, np.ndarray] = {}
        self.seconds = 0.0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            t0 = time.perf_counter()
            vecs = self.embedder.encode(missing, batch_size=self.batch_size)
            self.seconds += time.perf_counter() - t0
            self.vectors.update(zip(missing, vecs))
        if not texts:
            return np.zeros((0, self.embedder.dim), np.float32)
        return np.stack([self.vectors[t] for t in texts])


def run_learning_curve(
    paths: Sequence[str | Path],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    config: DistillerConfig | None = None,
    min_test: int = 500,
    targets: Sequence[float] = TARGETS,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the benchmark on the stream formed by ``paths`` in order; returns the results document.

    ``{"dataset", "stream_pairs", "test_pairs", "config", "points": [{"n", "agreement",
    "coverage": {"0.95", "0.98", "0.99"}, "train_seconds", ...}]}`` (coverage keyed by ``targets``)
    """
    targets = check_targets(targets)
    config = config or DistillerConfig()
    stream: list[Example] = []
    for p in paths:
        for e in examples_from_jsonl(p):
            e.id = len(stream)
            stream.append(e)
    fits, test = split_stream(stream, sizes, min_test=min_test)
    skipped = sorted(set(sizes) - set(fits))
    if skipped:
        log.info("sizes %s skipped: the stream has %d pairs", skipped, len(stream))
    from router.embedding import get_embedder

    cache = EmbedCache(get_embedder(config.embedder), config.embed_batch_size)
    points = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fits), desc="learning curve", unit="size")
    for n in fits:
        point: dict[str, Any] = {"n": n}
        try:
            dataset = build_dataset("bench", [replace(e) for e in stream[:n]], config)
        except NotEnoughData as exc:
            points.append({**point, "error": str(exc)})
            continue
        # Embeddings are computed before the clock starts: in production they are stored per exchange.
        cache([e.text for e in dataset.examples])
        t0 = time.perf_counter()
        try:
            cand = train_candidate(dataset, config, embed=cache, progress=progress)
        except UnsupportedRoute as exc:
            points.append({**point, "error": str(exc)})
            continue
        train_seconds = time.perf_counter() - t0
        texts = [cand.model.text_of(e.messages) for e in test]
        t1 = time.perf_counter()
        if cand.encoder_dir is not None:
            from router.embedding import Embedder

            X = Embedder(str(cand.encoder_dir)).encode(texts, batch_size=config.embed_batch_size)
        else:
            X = cache(texts)
        answers, raw, servable, _ = cand.model.decide(X, texts)
        conf = cand.model.confidence(raw, servable)
        predict_ms = (time.perf_counter() - t1) * 1000 / max(1, len(test))
        correct = agreement_vector(cand.model.kind, answers, [e.answer for e in test])
        curve = coverage_curve(conf, correct, max_points=None)
        thr = cand.metrics.get("threshold_at_target")
        served = conf >= thr if thr is not None else np.zeros(len(conf), bool)
        point.update(
            {
                "agreement": float(correct.mean()),
                "coverage": {f"{t:g}": coverage_at(curve, t) for t in targets},
                "train_seconds": round(train_seconds, 2),
                "finetune_seconds": round(cand.timings.get("finetune_seconds", 0.0), 2),
                "encoder": cand.metrics.get("encoder"),
                "kind": cand.model.kind,
                "train_pairs": len(dataset.train),
                "val_pairs": len(dataset.val),
                # What the router would actually do with the threshold chosen on validation:
                "val_threshold": thr,
                "served_at_val_threshold": float(served.mean()),
                "agreement_when_served": float(correct[served].mean()) if served.any() else None,
                "predict_ms_per_request": round(predict_ms, 3),
                "val_coverage_at_target": cand.metrics.get("coverage_at_target"),
            }
        )
        log.info("n=%d agreement %.3f coverage %s train %.1fs", n, point["agreement"],
                 {k: round(v, 3) for k, v in point["coverage"].items()}, train_seconds)
        points.append(point)
        if cand._tmp is not None:
            cand._tmp.cleanup()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "dataset": [str(p) for p in paths],
        "stream_pairs": len(stream),
        "test_pairs": len(test),
        "skipped_sizes": skipped,
        "targets": targets,
        "embed_seconds": round(cache.seconds, 2),
        "config": config.to_dict(),
        "points": points,
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    keys = [f"{t:g}" for t in result.get("targets", TARGETS)]
    lines = [
        f"learning curve: {', '.join(result['dataset'])} ({result['stream_pairs']} pairs, "
        f"{result['test_pairs']} held back)",
        "",
        "| N | encoder | agreement | " + " | ".join(f"cov@{float(k) * 100:g}" for k in keys) + " | train s |",
        "| ---: | --- | ---: | " + " | ".join("---:" for _ in keys) + " | ---: |",
    ]
    for p in result["points"]:
        if "error" in p:
            lines.append(f"| {p['n']} | - | {p['error']} |" + " |" * len(keys) + " |")
            continue
        c = p["coverage"]
        lines.append(f"| {p['n']} | {p['encoder']} | {p['agreement']:.1%} | "
                     + " | ".join(f"{c[k]:.1%}" for k in keys) + f" | {p['train_seconds']:.1f} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], *, results_dir: Path, out: Path | None = None) -> Path:
    """Save the full document (and the table) under ``results_dir``; ``out`` gets ``{"points": [...]}``
    plus the rest of the document. Returns the results file written under ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "-".join(Path(p).parent.name or Path(p).stem for p in result["dataset"][:1])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"learning-curve-{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(format_table(result) + "\n")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return path
