"""``kdgate bench splits``: which validation split certifies a version best, on a replay's own ledger.

A replay's ledger holds what a route's distiller saw: every teacher pair of shadow mode, then the
escalations and the sampled shadow checks of cascade mode. Cut at a request, each validation split
(``distiller.config.val_split``, with or without out-of-fold scoring) builds the route's dataset from
the pairs up to the cut, trains a candidate (frozen encoder, so that only the split differs), reads its
threshold off its own curve as the router does (the route's target and ``target_confidence``), and
serves the stream's next ``horizon`` requests, whose teacher answers the stream file holds. Reported
per cut and split: the share its own curve certifies, the share it serves of those requests and their
agreement, and its training time.

The stream positions follow the ledger's exchange ids (the ledger of a ``kdgate bench replay`` of the
same stream: its n-th exchange is the stream's n-th request).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["SPLITS", "run_splits", "format_table"]

SPLITS: dict[str, dict[str, Any]] = {
    "newest": {"val_split": "newest"},
    "holdout": {"val_split": "holdout"},  # the default: frozen-encoder versions cross-fitted on every pair
    "holdout-only": {"val_split": "holdout", "cross_fit_folds": 0},  # scored on the held-out pairs alone
    "holdout-plain": {"val_split": "holdout", "val_out_of_fold": False},
    "holdout-norefit": {"val_split": "holdout", "refit_on_validation": False},
}


def run_splits(
    ledger: Any, route: str, rows: list[dict[str, Any]], *, cutoffs: Sequence[int], horizon: int = 2000,
    splits: Sequence[str] = tuple(SPLITS), config: Any, progress: bool = False,
) -> dict[str, Any]:
    """Each split at each cut (see the module docstring); ``config`` is the distiller's, whose target
    and ``target_confidence`` the thresholds use (the encoder is kept frozen)."""
    from bench.learning_curve import EmbedCache
    from distiller.dataset import Example, build_dataset, route_examples
    from distiller.evaluate import agreement_vector
    from distiller.train import train_candidate
    from router.embedding import get_embedder
    from router.policy import certified_share, effective_threshold

    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {', '.join(unknown)}; known: {', '.join(SPLITS)}")
    every, _ = route_examples(ledger, route)
    if not every:
        raise ValueError(f"route {route!r} has no usable teacher pairs in this ledger")
    first_id = min((e.id for e in every), default=1)
    embed = EmbedCache(get_embedder(config.embedder), config.embed_batch_size)
    settings = {"target_agreement": config.target_agreement, "target_confidence": config.target_confidence}
    points = []
    for cutoff in cutoffs:
        future = rows[cutoff:cutoff + horizon]
        if not future:
            raise ValueError(f"cut at {cutoff}: the stream has no requests after it ({len(rows)} in all)")
        for name in splits:
            cfg = config.with_overrides({"finetune": "never", **SPLITS[name]})
            seen = [Example(**vars(e)) for e in every if e.id - first_id < cutoff]  # (build_dataset sets .text)
            dataset = build_dataset(route, seen, cfg)
            t0 = time.perf_counter()
            cand = train_candidate(dataset, cfg, embed=embed)
            seconds = time.perf_counter() - t0
            threshold = effective_threshold(settings, cand.curve)
            texts = [dataset.template.strip(r["messages"]) for r in future]
            answers, raw, servable, _ = cand.model.decide(embed(texts), texts)
            served = cand.model.confidence(raw, servable) >= threshold
            agree = agreement_vector(cand.model.kind, answers, [r["answer"] for r in future])
            point = {
                "cutoff": cutoff, "split": name, "train_pairs": len(dataset.train), "val_pairs": len(dataset.val),
                "val_checks": dataset.val_checks, "certified_coverage": round(certified_share(settings, cand.curve), 4),
                "served": round(float(served.mean()), 4),
                "served_agreement": round(float(agree[served].mean()), 4) if served.any() else None,
                "agreement": round(float(agree.mean()), 4), "train_seconds": round(seconds, 2),
            }
            points.append(point)
            if progress:
                print(format_row(point), flush=True)
    return {"route": route, "horizon": horizon, "splits": {s: SPLITS[s] for s in splits},
            "target_agreement": config.target_agreement, "target_confidence": config.target_confidence,
            "points": points, "mean": _means(points, splits)}


def _means(points: list[dict[str, Any]], splits: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in splits:
        mine = [p for p in points if p["split"] == name]
        served = sum(p["served"] for p in mine)
        agreeing = sum(p["served"] * p["served_agreement"] for p in mine if p["served_agreement"] is not None)
        out[name] = {"served": round(served / len(mine), 4) if mine else 0.0,
                     "served_agreement": round(agreeing / served, 4) if served else None,
                     "train_seconds": round(sum(p["train_seconds"] for p in mine) / max(len(mine), 1), 2)}
    return out


def format_row(p: dict[str, Any]) -> str:
    agreement = "-" if p["served_agreement"] is None else f"{p['served_agreement']:.2%}"
    return (f"| {p['cutoff']:,} | {p['split']} | {p['train_pairs']:,} | {p['val_pairs']:,} ({p['val_checks']} checks) | "
            f"{p['certified_coverage']:.1%} | {p['served']:.1%} | {agreement} | {p['train_seconds']:.1f} |")


def format_table(result: dict[str, Any]) -> str:
    lines = [f"route {result['route']}: each split cut at a request, serving the next {result['horizon']:,} "
             f"(target {result['target_agreement']:.0%}, confidence {result['target_confidence']:.0%})", "",
             "| cut | split | train | validation | certified | served next | agreement there | train s |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [format_row(p) for p in result["points"]]
    lines += ["", "| split | mean served | agreement | train s |", "| --- | ---: | ---: | ---: |"]
    for name, m in result["mean"].items():
        agreement = "-" if m["served_agreement"] is None else f"{m['served_agreement']:.2%}"
        lines.append(f"| {name} | {m['served']:.1%} | {agreement} | {m['train_seconds']:.1f} |")
    return "\n".join(lines)
