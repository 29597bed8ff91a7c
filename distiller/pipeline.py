"""One distillation run for a route: ledger -> dataset -> student -> artifact -> registry -> gate.

:func:`distill_route` never raises for a route that cannot be trained (too little data, free-text
answers): it returns a report saying why and records it as a route event for the dashboard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distiller import registry
from distiller.config import DistillerConfig
from distiller.dataset import Example, NotEnoughData, RouteDataset, load_route_dataset
from distiller.gate import GateResult, score_live, served_at_own_threshold
from distiller.train import Candidate, ReusedEncoder, UnsupportedRoute, train_candidate
from router.artifact import artifact_dir, new_artifact_dir, write_manifest
from store import registry as store_registry

log = logging.getLogger(__name__)

__all__ = ["DistillReport", "GateResult", "distill_route", "embedding_key", "embed_with_store", "gate", "artifact_dir"]


@dataclass
class DistillReport:
    """What one run did: status is 'trained', 'insufficient', 'free_text', 'interrupted' or 'failed'."""

    route: str
    status: str
    message: str
    version: int | None = None
    promoted: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    live_coverage: float | None = None
    have: int | None = None
    need: int | None = None
    last_exchange_id: int = 0
    gate: GateResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("metrics", "gate")} | {
            "metrics": {k: v for k, v in self.metrics.items() if k not in ("reliability", "history")},
            "gate": dataclasses.asdict(self.gate) if self.gate is not None else None,
        }


def embedding_key(embedder_key: str, dataset: RouteDataset) -> str:
    """The ``embeddings.model`` value for this route's texts: the model, and what defines the text
    (template fingerprint, scrubbing), so a changed template never reuses stale vectors."""
    key = f"{embedder_key}|t={dataset.template.fingerprint()[:12]}"
    return key + ("|pii" if dataset.pii_scrub else "")


def embed_with_store(
    ledger: Any, examples: Sequence[Example], embedder: Any, key: str, *, batch_size: int = 64, progress: bool = False
) -> dict[str, np.ndarray]:
    """Embeddings of the examples' texts, reusing the ledger's stored vectors and storing new ones.

    Returns text -> vector, so training can look vectors up by text.
    """
    stored = ledger.embeddings([e.id for e in examples], key)
    out: dict[str, np.ndarray] = {}
    missing = []
    for e in examples:
        blob = stored.get(e.id)
        if blob is not None:
            vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            out[e.text] = vec
        else:
            missing.append(e)
    if missing:
        log.info("embedding %d new exchanges (%d reused)", len(missing), len(examples) - len(missing))
        vecs = embedder.encode([e.text for e in missing], batch_size=batch_size, show_progress=progress)
        ledger.put_embeddings(key, {e.id: vecs[i].astype("<f4").tobytes() for i, e in enumerate(missing)}, vecs.shape[1])
        for i, e in enumerate(missing):
            out[e.text] = vecs[i]
    return out


def _lookup(vectors: dict[str, np.ndarray], dim: int) -> Callable[[Sequence[str]], np.ndarray]:
    """Texts -> their embeddings (from :func:`embed_with_store`'s result), as a (n, dim) array."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)

    return embed


def gate(
    ledger: Any, route: str, dataset: RouteDataset, cand: Candidate, target: float, *, min_pairs: int = 100,
    confidence: float | None = None,
) -> GateResult:
    """Compare a candidate with the live version on validation pairs the live version never saw.

    Each version is run as the router would run it: at the threshold its own validation curve gives
    for ``target`` (with the route's ``confidence`` bound, 95% by default), and the candidate wins if it serves a larger share of the
    same pairs while what it serves there is not significantly below the target. Read off these
    pairs alone, a bounded curve has little to go on in cascade mode (a few shadow checks and the
    hardest requests), and both versions would tie at serving nothing; the thresholds come from
    each version's whole validation split instead, and these pairs only compare the two.

    The live version was refit on its own newest pairs, which are part of this candidate's
    validation split; scored there it would look better than it is. So both are compared on the
    pairs newer than the live version's data, when there are at least ``min_pairs`` of them (all
    validation pairs otherwise). A live version that cannot be loaded or run serves nothing: a broken
    student must not block a working one.
    """
    row = registry.live(ledger, route)
    live_metrics = (row or {}).get("metrics") or {}
    seen = int(live_metrics.get("last_exchange_id") or 0)
    never_trained = _held_out_from(live_metrics, dataset)
    unseen = np.array([never_trained or e.id > seen for e in dataset.val], dtype=bool)
    unseen_only = row is not None and int(unseen.sum()) >= min_pairs
    use = unseen if unseen_only else np.ones(len(dataset.val), dtype=bool)
    picked = [e for e, u in zip(dataset.val, use) if u]
    weights = [e.weight for e in picked]

    def run(conf: Any, correct: Any, own_curve: Any) -> tuple[float, float, int, float]:
        return served_at_own_threshold(conf, correct, own_curve, weights=weights, target=target,
                                       target_confidence=confidence)

    result = GateResult(candidate=0.0, live=None, pairs=len(picked), unseen_only=unseen_only, target=target,
                        live_version=row["version"] if row else None)
    if dataset.val_split == "holdout" and live_metrics.get("val_split") == "holdout":
        result.candidate_certified = cand.metrics.get("certified_coverage")
        result.live_certified = live_metrics.get("certified_coverage")
    if cand.val_scores is not None:
        conf, correct = (np.asarray(a, dtype=np.float64)[use] for a in cand.val_scores)
        (result.candidate, result.candidate_agreement, result.candidate_served_pairs,
         result.candidate_raw) = run(conf, correct, cand.curve)
    else:
        result.candidate = result.candidate_raw = float(cand.metrics["coverage_at_target"])
    if row is None:
        return result
    return score_live(result, row, picked, run, route=route)


def _held_out_from(live_metrics: dict[str, Any], dataset: RouteDataset) -> bool:
    """Whether the live version never trained on any of ``dataset``'s validation pairs: both split
    by the prompt hash, the live version held out at least as large a share, and it shipped without
    a refit on its held-out pairs."""
    return (dataset.val_split == "holdout" and live_metrics.get("val_split") == "holdout"
            and "refit_pairs" not in live_metrics
            and float(live_metrics.get("holdout_fraction") or 0.0) >= (dataset.holdout_fraction or 1.0))


def _latest_encoder(
    ledger: Any, route: str, dataset: RouteDataset, config: DistillerConfig, row: dict[str, Any] | None, *,
    progress: bool = False,
) -> ReusedEncoder | None:
    """The route's newest fine-tuned encoder (``row``, from :func:`_latest_finetuned`), to retrain
    heads on without fine-tuning again.

    Fine-tuning takes minutes; new pairs arrive all the time. Between fine-tunings each head retrain
    also fits heads on the newest fine-tuned encoder (live or not: a background fine-tuning run is
    judged here, on the same fresh validation pairs as the other variants, rather than against a live
    version that has meanwhile trained on its validation pairs). Its embeddings are stored like the
    frozen ones. None when no version has a fine-tuned encoder of this base model, or it cannot be read.
    """
    if row is None:
        return None
    directory = Path(row["artifact_path"])
    try:
        from router.artifact import load_manifest

        load_manifest(directory, expected_checksum=row["checksum"])
        body = json.loads((directory / "student.json").read_text())
    except Exception as exc:  # a broken artifact just means nothing to reuse
        log.info("route %s: fine-tuned encoder of v%s not reused (%s)", route, row["version"], exc)
        return None
    if not body.get("encoder") or body.get("embedder") != config.embedder:
        return None
    from router.embedding import Embedder

    origin = int(body.get("encoder_origin") or row["version"])
    encoder = Embedder(str(directory / body["encoder"]))
    key = embedding_key(f"kdgate:{route}/v{origin}", dataset)
    vectors = embed_with_store(ledger, dataset.examples, encoder, key, batch_size=config.embed_batch_size,
                               progress=progress)
    return ReusedEncoder(path=directory / body["encoder"], origin=origin, embed=_lookup(vectors, encoder.dim),
                         trained_through=row["trained_through"], split=row.get("split") or "newest")


def _latest_finetuned(ledger: Any, route: str) -> dict[str, Any] | None:
    """The route's newest version with a fine-tuned encoder (see :func:`store.registry.latest_finetuned`)."""
    return store_registry.latest_finetuned(ledger, route)


def _copy_encoder(src: Path, dst: Path) -> None:
    """Artifacts are immutable, so a reused encoder is hard-linked (90 MB for MiniLM) where the
    filesystem allows it, copied otherwise."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _write_artifact(
    root: Path, route: str, version: int, cand: Candidate, dataset: RouteDataset, config: DistillerConfig,
    embedder_key: str, emb_key: str,
) -> tuple[Path, str]:
    directory = new_artifact_dir(root, route, version)
    extra: dict[str, Any] = {"embedder": config.embedder, "embedding_key": emb_key}
    if cand.encoder_dir is not None:
        _copy_encoder(cand.encoder_dir, directory / "encoder")
        # The version whose run fine-tuned these weights: later versions that reuse them share its
        # stored embeddings (and the ones the gateway stores while serving them).
        origin = int(cand.metrics.get("encoder_origin") or version)
        extra["encoder"] = "encoder"
        extra["encoder_origin"] = origin
        extra["embedding_key"] = embedding_key(f"kdgate:{route}/v{origin}", dataset)
    cand.model.save(directory, extra=extra)
    manifest = {
        "kind": cand.model.kind,
        "route": route,
        "version": version,
        "created": time.time(),
        "base_model": embedder_key,
        "encoder": "finetuned" if cand.encoder_dir is not None else "frozen",
        "train_pairs": len(dataset.train),
        "val_pairs": len(dataset.val),
        "detection": cand.detection.to_dict(),
        "calibration": cand.model.calibrator.to_dict(),
        "metrics": {k: v for k, v in cand.metrics.items() if k not in ("reliability", "history")},
    }
    return directory, write_manifest(directory, manifest)


def distill_route(
    ledger: Any,
    route: str,
    config: DistillerConfig,
    *,
    artifacts_root: Path | None = None,
    progress: bool = False,
    promote: bool = True,
    stop: Any = None,
) -> DistillReport:
    """Train a new version of ``route``'s student, register it, and promote it if it beats the live one.

    The promotion gate: at the route's target agreement, the candidate must cover more of the
    validation pairs than the live version does on the same pairs. ``stop`` (a threading.Event)
    interrupts a long encoder fine-tuning; the run then reports status 'interrupted' and registers
    nothing.
    """
    route_row = ledger.route(route)
    config = config.for_route(route_row["settings"] if route_row else None)
    root = Path(artifacts_root) if artifacts_root else config.artifacts_root(ledger.path)
    last_id = ledger.max_exchange_id(route)
    # Validation that reaches back for shadow checks stops at the data a reusable fine-tuned encoder
    # was trained on (see distiller.dataset._reach_back_for_checks).
    tuned = _latest_finetuned(ledger, route)
    try:
        dataset = load_route_dataset(ledger, route, config,
                                     val_floor_id=int(tuned["trained_through"]) if tuned else None)
    except NotEnoughData as exc:
        ledger.record_event(route, "distill.insufficient", actor="distiller", detail={"have": exc.have, "need": exc.need})
        log.info("%s", exc)
        return DistillReport(route, "insufficient", str(exc), have=exc.have, need=exc.need, last_exchange_id=last_id)

    from router.embedding import get_embedder

    embedder = get_embedder(config.embedder)
    emb_key = embedding_key(embedder.name, dataset)
    vectors = embed_with_store(ledger, dataset.examples, embedder, emb_key,
                               batch_size=config.embed_batch_size, progress=progress)
    embed = _lookup(vectors, embedder.dim)

    from distiller.finetune import FinetuneInterrupted

    reuse = _latest_encoder(ledger, route, dataset, config, tuned, progress=progress)
    try:
        cand = train_candidate(dataset, config, embed=embed, progress=progress, stop=stop, reuse_encoder=reuse)
    except FinetuneInterrupted as exc:
        return DistillReport(route, "interrupted", str(exc), last_exchange_id=0)
    except UnsupportedRoute as exc:
        ledger.record_event(route, "distill.detect", actor="distiller", detail=exc.detection.to_dict())
        return DistillReport(route, "free_text", str(exc), last_exchange_id=last_id)
    ledger.record_event(route, "distill.detect", actor="distiller", detail=cand.detection.to_dict())

    with _REGISTER_LOCK:  # a background fine-tuning run may register beside a head retrain
        return _register_and_gate(ledger, route, cand, dataset, config, root, embedder.name, emb_key, last_id,
                                  promote=promote)


_REGISTER_LOCK = threading.Lock()


def _register_and_gate(
    ledger: Any, route: str, cand: Candidate, dataset: RouteDataset, config: DistillerConfig, root: Path,
    embedder_key: str, emb_key: str, last_id: int, *, promote: bool,
) -> DistillReport:
    version = registry.next_version(ledger, route)
    directory, checksum = _write_artifact(root, route, version, cand, dataset, config, embedder_key, emb_key)
    metrics = dict(cand.metrics)
    metrics["last_exchange_id"] = last_id
    metrics["dropped"] = dataset.dropped
    metrics["template_chars"] = dataset.template.static_chars
    registry.register(
        ledger, route=route, version=version, kind=cand.model.kind, artifact_path=str(directory), checksum=checksum,
        train_pairs=len(dataset.train), val_pairs=len(dataset.val), metrics=metrics, curve=cand.curve,
        calibration=cand.model.calibrator.to_dict(),
    )
    result = gate(ledger, route, dataset, cand, config.target_agreement, confidence=config.target_confidence)
    live_cov, cov = result.live, result.candidate
    report = DistillReport(route, "trained", "", version=version, metrics=metrics, live_coverage=live_cov,
                           last_exchange_id=last_id, gate=result)
    baseline = live_cov if live_cov is not None else 0.0
    target = f"{config.target_agreement:.0%}"
    if result.candidate_wins() and promote:
        registry.promote(ledger, route, version, reason=result.promotion_reason())
        report.promoted = True
        report.message = (f"version {version} is live: serves {cov:.1%} of validation requests at its threshold for "
                          f"{target} agreement (live served {baseline:.1%}).")
    else:
        ledger.record_event(route, "student.kept_candidate", actor="distiller", detail=result.kept_detail(version))
        report.message = (f"version {version} stays a candidate: serves {cov:.1%} at its threshold for {target} "
                          f"agreement, {result.kept_reason()}.")
    return report
