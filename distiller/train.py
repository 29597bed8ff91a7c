"""Training a label/structured student from a route's dataset.

prepare (detect the task, targets per head) -> embed (stored embeddings reused) -> fit the heads
(logistic regression on soft labels where the teacher gave logprobs) -> calibrate on the validation
split -> evaluate; then, where the frozen encoder falls short of the route's target, fine-tune the
encoder within a CPU time budget and keep whichever version covers more at the target.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distiller.config import DistillerConfig
from distiller.dataset import Example, RouteDataset
from distiller.detect import Detection, detect_task, field_value_label, label_key, soft_label_distribution
from distiller.evaluate import agreement_vector, evaluate_confidence
from router.calibration import fit_calibrator
from router.label_student import ABSENT, Head, LabelModel
from router.lexical import EmptyVocabulary, LexicalFeatures
from router.neighbors import NeighborVotes

log = logging.getLogger(__name__)

__all__ = ["HeadTargets", "Candidate", "ReusedEncoder", "UnsupportedRoute", "prepare_targets", "fit_heads", "train_candidate"]

EmbedFn = Callable[[Sequence[str]], np.ndarray]


class UnsupportedRoute(Exception):
    """The route's answers are free text: no label/structured student can learn it."""

    def __init__(self, route: str, detection: Detection):
        self.detection = detection
        super().__init__(
            f"Route {route!r} is a free-text route ({detection.reason}); it is left to the LM student."
        )


@dataclass
class HeadTargets:
    """Training targets of one head: its classes and, per training example, a class distribution."""

    name: str
    classes: list[str]
    targets: np.ndarray  # (n_train, classes) float32 rows summing to 1
    counts: np.ndarray  # hard-label examples per class
    soft_rows: int = 0  # how many rows came from teacher logprobs


@dataclass
class Candidate:
    """A trained, calibrated and evaluated version, not yet written as an artifact."""

    model: LabelModel
    detection: Detection
    metrics: dict[str, Any]
    curve: list[dict[str, float]]
    encoder_dir: Path | None = None  # a fine-tuned encoder (sentence-transformers directory)
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # each variant tried, with metrics
    _tmp: Any = None  # keeps the fine-tuned encoder's temporary directory alive
    # (cross-fitted calibrated confidence, agreement) per validation pair, measured before the refit:
    # the promotion gate compares on them
    val_scores: tuple[np.ndarray, np.ndarray] | None = None


def _example_class(detection: Detection, e: Example, field_name: str | None) -> str:
    if detection.kind == "label":
        return label_key(e.answer)
    import json

    obj = json.loads(e.answer)
    return field_value_label(obj[field_name]) if field_name in obj else ABSENT


def prepare_targets(detection: Detection, train: Sequence[Example]) -> list[HeadTargets]:
    """Per head, the classes seen in training and each example's target distribution.

    For label routes the teacher's first-token ``top_logprobs`` become soft targets (the teacher's
    probability on each label); labels it only ever gave probability to still become classes.
    """
    names: list[str | None] = [None] if detection.kind == "label" else list(detection.fields)
    heads = []
    for name in names:
        hard = [_example_class(detection, e, name) for e in train]
        counts = Counter(hard)
        classes = sorted(counts)
        soft: list[dict[str, float] | None] = [None] * len(train)
        if detection.kind == "label":
            for i, e in enumerate(train):
                soft[i] = soft_label_distribution(e.logprobs, hard[i], classes)
        index = {c: j for j, c in enumerate(classes)}
        targets = np.zeros((len(train), len(classes)), dtype=np.float32)
        n_soft = 0
        for i, h in enumerate(hard):
            dist = soft[i]
            if dist:
                n_soft += 1
                for c, p in dist.items():
                    if c in index:
                        targets[i, index[c]] += p
                targets[i] /= targets[i].sum()
            else:
                targets[i, index[h]] = 1.0
        heads.append(
            HeadTargets(
                name=name or "label",
                classes=classes,
                targets=targets,
                counts=np.array([counts[c] for c in classes]),
                soft_rows=n_soft,
            )
        )
    return heads


def _torch_features(X: Any) -> Any:
    """Dense embeddings or a scipy sparse matrix (TF-IDF) as a torch tensor."""
    import torch

    if hasattr(X, "tocsr"):
        A = X.tocsr().astype(np.float32)
        return torch.sparse_csr_tensor(
            torch.from_numpy(A.indptr.astype(np.int64)),
            torch.from_numpy(A.indices.astype(np.int64)),
            torch.from_numpy(A.data),
            size=A.shape,
            check_invariants=False,
        )
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))


def _fit_softmax_torch(X: Any, targets: np.ndarray, C: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, scikit-learn's objective (C * sum of losses + |W|^2 / 2),
    solved with full-batch L-BFGS in torch: it takes soft targets as they are and fits 10k x 77
    classes in seconds where lbfgs in scikit-learn takes tens of seconds. X may be sparse."""
    import torch

    n, d = X.shape
    k = targets.shape[1]
    T = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    W = torch.zeros(d, k, requires_grad=True)  # (dim, classes): sparse @ dense needs it this way round
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xt @ W + b, T) + (W * W).sum() / (2 * C * n)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's beta notice for CSR tensors
        Xt = _torch_features(X)
        opt.step(closure)
    return np.ascontiguousarray(W.detach().numpy().T, dtype=np.float32), b.detach().numpy().astype(np.float32)


def fit_heads(
    heads: Sequence[HeadTargets], X: Any, config: DistillerConfig, *, C: float | None = None
) -> list[Head]:
    """Logistic-regression heads on features X (embeddings, or a sparse TF-IDF matrix), trained on
    each head's (soft) targets.

    ``config.head_solver`` picks the solver: "torch" (default, fast) or "sklearn"
    (scikit-learn's LogisticRegression, soft targets as weighted rows); same objective.
    ``C`` overrides ``config.head_c``.
    """
    C = config.head_c if C is None else C
    out = []
    for ht in heads:
        served = ht.counts >= config.min_label_examples
        k = len(ht.classes)
        if k == 1:
            out.append(Head(ht.name, ht.classes, np.zeros((1, X.shape[1]), np.float32), np.zeros(1, np.float32), served))
            continue
        if config.head_solver == "torch":
            W, b = _fit_softmax_torch(X, ht.targets, C, config.head_max_iter)
            out.append(Head(ht.name, ht.classes, W, b, served))
            continue
        from sklearn.linear_model import LogisticRegression

        rows, cols = np.nonzero(ht.targets > 1e-4)
        weights = ht.targets[rows, cols]
        clf = LogisticRegression(C=C, max_iter=config.head_max_iter, tol=1e-4)
        clf.fit(X[rows], cols, sample_weight=weights)
        W = np.zeros((k, X.shape[1]), dtype=np.float32)
        b = np.full(k, -1e4, dtype=np.float32)  # a class with no weight at all is never chosen
        if len(clf.classes_) == 2:  # sklearn's binary form: one weight vector for class 1
            coef = clf.coef_[0] / 2.0
            W[clf.classes_[1]], W[clf.classes_[0]] = coef, -coef
            b[clf.classes_[1]], b[clf.classes_[0]] = clf.intercept_[0] / 2.0, -clf.intercept_[0] / 2.0
        else:
            W[clf.classes_] = clf.coef_
            b[clf.classes_] = clf.intercept_
        out.append(Head(ht.name, ht.classes, W, b, served))
    return out


def fit_lexical(
    heads: Sequence[HeadTargets], texts: Sequence[str], config: DistillerConfig
) -> tuple[LexicalFeatures | None, list[Head] | None]:
    """TF-IDF features and one head per target set on them; (None, None) when the blend is off
    (``lexical_weight`` 0) or no word n-gram occurs often enough to be a feature."""
    if config.lexical_weight <= 0:
        return None, None
    try:
        lexical = LexicalFeatures.fit(texts, min_df=config.lexical_min_df)
    except EmptyVocabulary as exc:
        log.info("no lexical features (%s); the student uses embeddings alone", exc)
        return None, None
    return lexical, fit_heads(heads, lexical.transform(texts), config, C=config.lexical_c)


def fit_neighbors(heads: Sequence[HeadTargets], X: np.ndarray, config: DistillerConfig) -> NeighborVotes | None:
    """The neighbour memory over embeddings X: each pair's class per head (the teacher's answer, or
    its most likely label where it gave logprobs). None when the view is off (``neighbor_weight`` 0)."""
    if config.neighbor_weight <= 0 or X.shape[0] == 0:
        return None
    return NeighborVotes.fit(X, [ht.targets.argmax(axis=1) for ht in heads], max_pairs=config.neighbor_max_pairs,
                             k=config.neighbor_k, temperature=config.neighbor_temperature)


def calibrate_and_evaluate(
    model: LabelModel, X_val: np.ndarray, val: Sequence[Example], config: DistillerConfig, *, seed: int = 0,
    decided: tuple[list[str], np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, Any], list[dict[str, float]], tuple[np.ndarray, np.ndarray]]:
    """Fit the model's calibrator on the validation split and evaluate it there.

    The reported figures use cross-fitted confidences (each half calibrated on the other half), so
    the curve and ECE are not scored on the data the calibrator saw; the stored calibrator is then
    fitted on the whole split. Returns the metrics, the curve and, per validation pair, the
    cross-fitted confidence and agreement. ``decided`` (answers, raw scores, servable mask) replaces
    the model's own decisions on the split (out-of-fold scores, see :func:`score_out_of_fold`).
    """
    answers, raw, servable = decided or model.decide(X_val, [e.text for e in val])[:3]
    correct = agreement_vector(model.kind, answers, [e.answer for e in val])
    n = len(val)
    conf = np.zeros(n)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % 2
    for f in (0, 1):
        fit_on, score_on = fold != f, fold == f
        if fit_on.sum() == 0 or score_on.sum() == 0:
            continue
        cal = fit_calibrator(raw[fit_on], correct[fit_on])
        conf[score_on] = cal(raw[score_on])
    conf = np.where(servable, conf, 0.0)
    model.calibrator = fit_calibrator(raw, correct)
    metrics, curve = evaluate_confidence(conf, correct, target=config.target_agreement, weights=[e.weight for e in val])
    metrics["calibration_method"] = model.calibrator.method
    return metrics, curve, (conf, correct)


def score_out_of_fold(
    detection: Detection, dataset: RouteDataset, scored: Sequence[Example], X_scored: np.ndarray,
    config: DistillerConfig, *, fixed: Sequence[Example] = (), X_fixed: np.ndarray | None = None, folds: int = 2,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Answers, raw scores and servable mask for every pair of ``scored``, each from a model that
    never saw it: ``scored`` is cut into ``folds`` random folds, and each is scored by heads, lexical
    features and neighbour memory fit on the ``fixed`` pairs (embeddings ``X_fixed``) plus the other
    folds.

    A split that is not the newest pairs (the prompt-hash holdout, or a reach-back for shadow
    checks) is scored so with ``fixed`` the training pairs: a model fit on those alone would learn
    from fewer pairs than the version that ships, and lose every comparison for it. With ``fixed``
    empty and ``scored`` every pair, it is K-fold cross-fitting of the whole dataset.
    """
    n = len(scored)
    fold = np.random.default_rng(config.seed + 1).permutation(n) % folds
    answers: list[str] = [""] * n
    raw = np.zeros(n)
    servable = np.zeros(n, dtype=bool)
    X_fixed = X_scored[:0] if X_fixed is None else X_fixed
    for f in range(folds):
        fit_idx, score_idx = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        if len(score_idx) == 0:
            continue
        model = fit_model(detection, dataset, [*fixed, *(scored[i] for i in fit_idx)],
                          np.concatenate([X_fixed, X_scored[fit_idx]]), config)
        a, r, s, _ = model.decide(X_scored[score_idx], [scored[i].text for i in score_idx])
        for j, i in enumerate(score_idx):
            answers[i] = a[j]
        raw[score_idx], servable[score_idx] = r, s
    return answers, raw, servable


def _label_model(
    detection: Detection, dataset: RouteDataset, heads: Any, lexical: tuple[Any, Any], config: DistillerConfig,
    neighbors: NeighborVotes | None = None,
) -> LabelModel:
    """A student over ``heads`` (and the lexical features and heads, and the neighbour memory, if
    any) that answers in the route's format (frozen or fine-tuned encoder alike)."""
    return LabelModel(
        kind=detection.kind,
        heads=heads,
        template=dataset.template,
        surfaces=detection.surfaces,
        json_format=detection.json_format,
        pii_scrub=dataset.pii_scrub,
        lexical=lexical[0],
        lexical_heads=lexical[1],
        lexical_weight=config.lexical_weight,
        neighbors=neighbors,
        neighbor_weight=config.neighbor_weight,
    )


def refit_on_all(
    cand: Candidate, dataset: RouteDataset, X_all: np.ndarray, config: DistillerConfig
) -> LabelModel:
    """The shipped model: heads (and lexical features) refit on training plus validation pairs, with
    the calibrator fitted on validation. The newest pairs are the most like tomorrow's traffic; a
    2k-pair route otherwise serves from a model that never saw a fifth of its data. The version's
    metrics stay those measured on validation by the model trained without it (a conservative
    estimate of the refit model)."""
    model = fit_model(cand.detection, dataset, dataset.train + dataset.val, X_all, config)
    model.calibrator = cand.model.calibrator
    return model


def fit_model(
    detection: Detection, dataset: RouteDataset, examples: Sequence[Example], X: np.ndarray, config: DistillerConfig
) -> LabelModel:
    """A student fit on ``examples`` (embeddings ``X``, same order): heads, lexical features and
    heads, neighbour memory; its calibrator is the caller's to set."""
    targets = prepare_targets(detection, examples)
    lexical = fit_lexical(targets, [e.text for e in examples], config)
    return _label_model(detection, dataset, fit_heads(targets, X, config), lexical, config,
                        fit_neighbors(targets, X, config))


def _score_out_of_fold(
    cand: Candidate, dataset: RouteDataset, X_train: np.ndarray, X_val: np.ndarray, config: DistillerConfig,
) -> float:
    """Replace ``cand``'s curve, calibrator and validation scores with out-of-fold ones (see
    :func:`score_out_of_fold`): every pair cross-fitted when its encoder is frozen and the split is
    the holdout, the validation pairs alone otherwise. Returns the share its curve certifies for the
    target (as the router reads it)."""
    from router.policy import certified_share

    if cand.encoder_dir is None and _cross_fits(dataset, config):
        scored, X_scored = dataset.train + dataset.val, np.concatenate([X_train, X_val])
        decided = score_out_of_fold(cand.detection, dataset, scored, X_scored, config, folds=config.cross_fit_folds)
    else:
        scored, X_scored = dataset.val, X_val
        decided = score_out_of_fold(cand.detection, dataset, scored, X_scored, config, fixed=dataset.train,
                                    X_fixed=X_train)
    metrics, cand.curve, (conf, correct) = calibrate_and_evaluate(cand.model, X_scored, scored, config,
                                                                  seed=config.seed, decided=decided)
    tail = len(scored) - len(dataset.val)  # the gate compares on the validation pairs: theirs are the last
    cand.val_scores = (conf[tail:], correct[tail:])
    share = certified_share({"target_agreement": config.target_agreement,
                             "target_confidence": config.target_confidence}, cand.curve)
    cand.metrics.update(metrics, scored_out_of_fold=True, certified_on_pairs=len(scored),
                        certified_coverage=round(share, 4))
    log.info("route %s %s student out of fold on %d pairs: coverage %.3f at %.2f, %.3f certified", dataset.route,
             cand.metrics.get("encoder"), len(scored), metrics["coverage_at_target"], config.target_agreement, share)
    return share


def _cross_fits(dataset: RouteDataset, config: DistillerConfig) -> bool:
    """Whether a frozen-encoder version is scored by cross-fitting every pair (holdout split)."""
    return config.cross_fit_folds >= 2 and dataset.val_split == "holdout"


@dataclass
class ReusedEncoder:
    """A fine-tuned encoder of an earlier version, offered for a head retrain (see
    :func:`distiller.pipeline._latest_encoder`)."""

    path: Path  # its sentence-transformers directory
    origin: int  # the version whose run fine-tuned it
    embed: EmbedFn  # its (stored) embeddings of the route's texts
    trained_through: int = 0  # the newest exchange id it was fine-tuned on
    split: str = "newest"  # the validation split of the run that tuned it ("holdout": no held-out prompt seen)


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["coverage_at_target"], a["agreement"]) > (b["coverage_at_target"], b["agreement"])


def train_candidate(
    dataset: RouteDataset,
    config: DistillerConfig,
    *,
    embed: EmbedFn,
    detection: Detection | None = None,
    progress: bool = False,
    stop: Any = None,
    reuse_encoder: ReusedEncoder | None = None,
) -> Candidate:
    """Train, calibrate and evaluate the best label/structured student for ``dataset``.

    ``embed`` maps texts to frozen-encoder embeddings (the caller reuses stored ones). Variants: the
    frozen encoder; ``reuse_encoder`` (an earlier fine-tuned encoder, new heads); and, when
    configured and the best so far falls short, a newly fine-tuned encoder. The one that covers
    most at the target on validation wins. Raises :class:`UnsupportedRoute` for free-text routes.
    """
    detection = detection or detect_task([e.answer for e in dataset.examples], config)
    if detection.kind == "free_text":
        raise UnsupportedRoute(dataset.route, detection)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    X_train = embed([e.text for e in dataset.train])
    X_val = embed([e.text for e in dataset.val])
    timings["embed_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets = prepare_targets(detection, dataset.train)
    lexical = fit_lexical(targets, [e.text for e in dataset.train], config)
    common = {
        "lexical_features": lexical[0].dim if lexical[0] is not None else 0,
        "soft_label_rows": int(sum(t.soft_rows for t in targets)),
        "val_checks": dataset.val_checks,
        "val_reach_back": dataset.val_reach_back,
        "val_split": dataset.val_split,
    }
    if dataset.holdout_fraction is not None:
        common["holdout_fraction"] = round(dataset.holdout_fraction, 6)

    history: list[dict[str, Any]] = []  # every variant tried, shared by the candidates

    def variant(
        name: str, Xt: np.ndarray, Xv: np.ndarray, *, label: str | None = None, tried: dict[str, Any] | None = None,
        **extra: Any,
    ) -> tuple[Candidate, list[Head]]:
        heads = fit_heads(targets, Xt, config)
        model = _label_model(detection, dataset, heads, lexical, config, fit_neighbors(targets, Xt, config))
        metrics, curve, scores = calibrate_and_evaluate(model, Xv, dataset.val, config, seed=config.seed)
        metrics.update(encoder=name, **common, **extra)
        log.info("route %s %s student: agreement %.3f, coverage %.3f at %.2f (%d train, %d val)", dataset.route,
                 label or name, metrics["agreement"], metrics["coverage_at_target"], config.target_agreement,
                 len(dataset.train), len(dataset.val))
        history.append({"encoder": label or name, "coverage_at_target": metrics["coverage_at_target"],
                        "agreement": metrics["agreement"], **(tried or {})})
        cand = Candidate(model=model, detection=detection, metrics=metrics, curve=curve, timings=timings,
                         history=history, val_scores=scores)
        return cand, heads

    best, heads = variant("frozen", X_train, X_val)
    frozen = (best, X_train, X_val)
    timings["head_seconds"] = time.perf_counter() - t0

    if reuse_encoder is not None and dataset.val_split == "holdout" and reuse_encoder.split != "holdout":
        # tuned on the older pairs, held-out prompts among them: its scores there would flatter it
        log.info("route %s: v%s's encoder was tuned before the holdout split; not reused", dataset.route,
                 reuse_encoder.origin)
        reuse_encoder = None
    if reuse_encoder is not None:
        Xr_train = reuse_encoder.embed([e.text for e in dataset.train])
        Xr_val = reuse_encoder.embed([e.text for e in dataset.val])
        reused, _ = variant("finetuned", Xr_train, Xr_val, label=f"finetuned (v{reuse_encoder.origin}'s, reused)",
                            encoder_origin=reuse_encoder.origin, encoder_trained_through=reuse_encoder.trained_through,
                            encoder_split=reuse_encoder.split)
        if _better(reused.metrics, best.metrics):
            reused.encoder_dir = reuse_encoder.path
            best, X_train, X_val = reused, Xr_train, Xr_val

    want = config.finetune == "always" or (
        config.finetune == "auto" and best.metrics["coverage_at_target"] < config.finetune_below_coverage
    )
    if want and len(dataset.train) >= config.finetune_min_pairs and config.finetune_budget_s > 0:
        from distiller.finetune import finetune_encoder

        tmp = tempfile.TemporaryDirectory(prefix="kdgate-encoder-")
        t0 = time.perf_counter()
        result = finetune_encoder(  # raises FinetuneInterrupted on stop: the caller registers nothing
            config.embedder,
            [e.text for e in dataset.train],
            targets,
            heads,
            config,
            out_dir=Path(tmp.name) / "encoder",
            progress=progress,
            stop=stop,
        )
        from router.embedding import Embedder

        tuned = Embedder(str(result.path))
        tuned._model = result.model  # already in memory
        Xt_train = tuned.encode([e.text for e in dataset.train], batch_size=config.embed_batch_size)
        Xt_val = tuned.encode([e.text for e in dataset.val], batch_size=config.embed_batch_size)
        fresh, _ = variant("finetuned", Xt_train, Xt_val, tried=result.summary(), finetune=result.summary(),
                           encoder_trained_through=dataset.train[-1].id if dataset.train else 0,
                           encoder_split=dataset.val_split)
        timings["finetune_seconds"] = time.perf_counter() - t0
        log.info("route %s: encoder fine-tuning took %.0f s", dataset.route, timings["finetune_seconds"])
        if _better(fresh.metrics, best.metrics):
            fresh.encoder_dir, fresh._tmp = result.path, tmp
            best, X_train, X_val = fresh, Xt_train, Xt_val
        else:
            tmp.cleanup()
    # A split that is not the newest pairs is scored again by fold models that also learnt from the
    # rest of the split, as the refit version that ships does (a model that ships without the refit
    # is the one its own validation scores describe). On the frozen encoder, which no pair trained,
    # every pair is scored so (cross_fit_folds): its curve then rests on all the route's labelled
    # pairs, a fine-tuned encoder's on the held-out fifth. Certification is what limits a version in
    # cascade mode, so when a fine-tuned variant won on plain scores, the frozen one is certified too
    # and the variant whose certified share is larger ships.
    if ((dataset.val_reach_back > 0 or dataset.val_split == "holdout") and config.refit_on_validation
            and config.val_out_of_fold and dataset.val):
        t0 = time.perf_counter()
        contenders = [(best, X_train, X_val)]
        if best is not frozen[0] and _cross_fits(dataset, config):
            contenders.append(frozen)
        certified = [_score_out_of_fold(c, dataset, Xt, Xv, config) for c, Xt, Xv in contenders]
        best, X_train, X_val = contenders[int(np.argmax(certified))]  # the first on a tie
        for loser, _, _ in contenders:
            if loser is not best and loser._tmp is not None:
                loser._tmp.cleanup()  # a fine-tuned encoder that does not ship
        if len(contenders) > 1:
            history.append({"encoder": "certified", "coverage_at_target": max(certified),
                            "agreement": best.metrics["agreement"],
                            "certified": {c.metrics["encoder"]: round(v, 4) for (c, _, _), v in zip(contenders, certified)}})
        timings["out_of_fold_seconds"] = time.perf_counter() - t0
    if config.refit_on_validation and dataset.val:
        t0 = time.perf_counter()
        best.model = refit_on_all(best, dataset, np.concatenate([X_train, X_val]), config)
        timings["refit_seconds"] = time.perf_counter() - t0
        best.metrics["refit_pairs"] = len(dataset.train) + len(dataset.val)
    best.metrics["history"] = history
    best.metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return best
