"""Runtime of the "label" and "structured" students: embeddings of what varies + linear heads.

Artifact layout (see :mod:`router.artifact`)::

    manifest.json       kind, route, version, embedder, metrics, ... (checksums of every file)
    student.json        template, heads (names, classes, served mask), label spellings, JSON fields
                        and format, calibration
    heads.safetensors   head{i}.W (classes x dim) and head{i}.b (classes), float32; with lexical
                        features also lex{i}.W / lex{i}.b and lexical.idf; with neighbour votes
                        knn.X and knn.y{i} (see :mod:`router.neighbors`)
    encoder/            only when the encoder was fine-tuned: a sentence-transformers directory
                        (safetensors weights, JSON config, tokenizer files)

:class:`LabelModel` holds the math and is shared with the distiller, so a version is evaluated by
exactly the code that will serve it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.calibration import Calibrator, IdentityCalibrator, calibrator_from_dict
from router.lexical import LexicalFeatures
from router.neighbors import NeighborVotes
from router.student import StudentError, StudentOutput, register_kind
from router.template import Template, scrub_pii

log = logging.getLogger(__name__)

__all__ = ["Head", "LabelModel", "LabelStudent", "load_label_student", "dumps_in_format", "ABSENT"]

ABSENT = "\u0000absent"  # class of a structured field the teacher left out


def dumps_in_format(obj: dict[str, Any], fmt: dict[str, Any]) -> str:
    """Serialize ``obj`` (already in the teacher's key order) with the teacher's spacing."""
    return json.dumps(
        obj,
        separators=tuple(fmt.get("separators", (", ", ": "))),
        indent=fmt.get("indent"),
        ensure_ascii=bool(fmt.get("ensure_ascii", False)),
    )


@dataclass
class Head:
    """One softmax classifier: the route's label, or one field of a structured answer."""

    name: str
    classes: list[str]  # label keys (label kind) or canonical JSON values / ABSENT (structured)
    W: np.ndarray  # (classes, dim) float32
    b: np.ndarray  # (classes,) float32
    served: np.ndarray  # (classes,) bool: False for labels with too few examples to be trusted

    def probs(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes)."""
        if len(self.classes) == 1:
            return np.ones((X.shape[0], 1), dtype=np.float32)
        z = X @ self.W.T + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


class LabelModel:
    """Heads + calibration + output format of a label or structured student."""

    def __init__(
        self,
        *,
        kind: str,
        heads: list[Head],
        template: Template,
        calibrator: Calibrator | None = None,
        surfaces: dict[str, str] | None = None,
        json_format: dict[str, Any] | None = None,
        pii_scrub: bool = False,
        lexical: LexicalFeatures | None = None,
        lexical_heads: list[Head] | None = None,
        lexical_weight: float = 0.0,
        neighbors: NeighborVotes | None = None,
        neighbor_weight: float = 0.0,
    ):
        if kind not in ("label", "structured"):
            raise ValueError(f"LabelModel kind must be label or structured, not {kind!r}")
        self.kind = kind
        self.heads = heads
        self.template = template
        self.calibrator = calibrator or IdentityCalibrator()
        self.surfaces = surfaces or {}
        self.json_format = json_format or {}
        self.pii_scrub = pii_scrub
        # Optional second view of the text: a TF-IDF head per field, blended with the embedding head
        # as a weighted geometric mean of the two distributions (weight on the lexical side).
        self.lexical = lexical if lexical_heads else None
        self.lexical_heads = lexical_heads or []
        self.lexical_weight = float(lexical_weight) if self.lexical is not None else 0.0
        if self.lexical is not None and len(self.lexical_heads) != len(heads):
            raise ValueError("LabelModel: one lexical head per embedding head is needed")
        # Optional third view: the votes of the nearest training pairs in the embedding space.
        self.neighbors = neighbors if neighbor_weight > 0 else None
        self.neighbor_weight = float(neighbor_weight) if self.neighbors is not None else 0.0
        if self.neighbors is not None and len(self.neighbors.labels) != len(heads):
            raise ValueError("LabelModel: the neighbour memory needs one label column per head")
        if self.lexical_weight + self.neighbor_weight >= 1.0:
            raise ValueError("LabelModel: the lexical and neighbour weights must leave the embedding head a share")

    # -- inputs -------------------------------------------------------------------------------
    def text_of(self, messages: list[dict[str, Any]]) -> str:
        """What the student embeds for a request: the varying text (scrubbed if trained so)."""
        text = self.template.strip(messages)
        return scrub_pii(text) if self.pii_scrub else text

    # -- outputs ------------------------------------------------------------------------------
    def head_probs(self, X: np.ndarray, texts: list[str] | None = None) -> list[np.ndarray]:
        """Per head, the class distribution: the embedding head's, blended with the lexical head's and
        the neighbour votes (a weighted geometric mean, renormalized) where the model has them."""
        views: list[tuple[float, list[np.ndarray]]] = []
        if self.lexical is not None:
            if texts is None or len(texts) != X.shape[0]:
                raise ValueError("this student has lexical features: decide() needs the texts as well")
            L = self.lexical.transform(texts)
            views.append((self.lexical_weight, [lex.probs(L) for lex in self.lexical_heads]))
        if self.neighbors is not None:
            views.append((self.neighbor_weight, self.neighbors.probs(X, [len(h.classes) for h in self.heads])))
        own = [head.probs(X) for head in self.heads]
        if not views:
            return own
        w_own = 1.0 - sum(w for w, _ in views)
        out = []
        for h, pe in enumerate(own):
            if pe.shape[1] == 1:
                out.append(pe)
                continue
            z = w_own * np.log(pe + 1e-12)
            for w, probs in views:
                z = z + w * np.log(probs[h] + 1e-12)
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            out.append(e / e.sum(axis=1, keepdims=True))
        return out

    def decide(
        self, X: np.ndarray, texts: list[str] | None = None
    ) -> tuple[list[str], np.ndarray, np.ndarray, list[list[int]]]:
        """For embeddings X (and the texts they embed): (answers in the teacher's format, raw scores,
        servable mask, class ids).

        The raw score is the product over heads of the margin between the top two probabilities:
        on held-back banking77 it ranks right answers above wrong ones better than the top
        probability alone (a runner-up close behind is the typical confusion). Calibration then
        turns the score into agreement odds.
        """
        n = X.shape[0]
        raw = np.ones(n, dtype=np.float64)
        servable = np.ones(n, dtype=bool)
        picks: list[np.ndarray] = []
        for head, p in zip(self.heads, self.head_probs(X, texts)):
            idx = p.argmax(axis=1)
            if p.shape[1] > 1:
                top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
                raw *= top2[:, 1] - top2[:, 0]
            servable &= head.served[idx]
            picks.append(idx)
        choice = [[int(picks[h][i]) for h in range(len(self.heads))] for i in range(n)]
        return [self.format_answer(c) for c in choice], raw, servable, choice

    def format_answer(self, choice: list[int]) -> str:
        if self.kind == "label":
            key = self.heads[0].classes[choice[0]]
            return self.surfaces.get(key, key)
        obj = {}
        for head, c in zip(self.heads, choice):
            value = head.classes[c]
            if value != ABSENT:
                obj[head.name] = json.loads(value)
        return dumps_in_format(obj, self.json_format)

    def confidence(self, raw: np.ndarray, servable: np.ndarray) -> np.ndarray:
        """Calibrated probability of agreeing with the teacher; 0 where a rare label was chosen."""
        conf = np.asarray(self.calibrator(raw), dtype=np.float64)
        return np.where(servable, conf, 0.0)

    # -- files --------------------------------------------------------------------------------
    def save(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        """Write student.json and heads.safetensors into ``directory``."""
        from safetensors.numpy import save_file

        tensors = {}
        for i, h in enumerate(self.heads):
            tensors[f"head{i}.W"] = np.ascontiguousarray(h.W, dtype=np.float32)
            tensors[f"head{i}.b"] = np.ascontiguousarray(h.b, dtype=np.float32)
        lexical = None
        if self.lexical is not None:
            for i, h in enumerate(self.lexical_heads):
                tensors[f"lex{i}.W"] = np.ascontiguousarray(h.W, dtype=np.float32)
                tensors[f"lex{i}.b"] = np.ascontiguousarray(h.b, dtype=np.float32)
            tensors["lexical.idf"] = self.lexical.idf
            lexical = {**self.lexical.to_dict(), "weight": self.lexical_weight}
        neighbors = None
        if self.neighbors is not None:
            tensors.update(self.neighbors.tensors())
            neighbors = {**self.neighbors.to_dict(), "weight": self.neighbor_weight}
        save_file(tensors, str(directory / "heads.safetensors"))
        body = {
            "kind": self.kind,
            "template": self.template.to_dict(),
            "heads": [{"name": h.name, "classes": h.classes, "served": [bool(v) for v in h.served]} for h in self.heads],
            "surfaces": self.surfaces,
            "json_format": self.json_format,
            "calibration": self.calibrator.to_dict(),
            "pii_scrub": self.pii_scrub,
            "lexical": lexical,
            "neighbors": neighbors,
            **(extra or {}),
        }
        (directory / "student.json").write_text(json.dumps(body, ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, directory: Path) -> tuple[LabelModel, dict[str, Any]]:
        """Read a model written by :meth:`save`; returns it and the raw student.json body."""
        from safetensors.numpy import load_file

        body = json.loads((directory / "student.json").read_text())
        tensors = load_file(str(directory / "heads.safetensors"))
        heads = [
            Head(
                name=h["name"],
                classes=list(h["classes"]),
                W=tensors[f"head{i}.W"],
                b=tensors[f"head{i}.b"],
                served=np.asarray(h["served"], dtype=bool),
            )
            for i, h in enumerate(body["heads"])
        ]
        lexical, lexical_heads, weight = None, None, 0.0
        if body.get("lexical"):
            lexical = LexicalFeatures.from_saved(body["lexical"], tensors["lexical.idf"])
            lexical_heads = [
                Head(name=h.name, classes=h.classes, W=tensors[f"lex{i}.W"], b=tensors[f"lex{i}.b"], served=h.served)
                for i, h in enumerate(heads)
            ]
            weight = float(body["lexical"].get("weight", 0.0))
        neighbors, neighbor_weight = None, 0.0
        if body.get("neighbors"):
            neighbors = NeighborVotes.from_saved(body["neighbors"], tensors, len(heads))
            neighbor_weight = float(body["neighbors"].get("weight", 0.0))
        model = cls(
            kind=body["kind"],
            heads=heads,
            template=Template.from_dict(body.get("template")),
            calibrator=calibrator_from_dict(body.get("calibration")),
            surfaces=body.get("surfaces") or {},
            json_format=body.get("json_format") or {},
            pii_scrub=bool(body.get("pii_scrub", False)),
            lexical=lexical,
            lexical_heads=lexical_heads,
            lexical_weight=weight,
            neighbors=neighbors,
            neighbor_weight=neighbor_weight,
        )
        return model, body


class LabelStudent:
    """A loaded label/structured student (the :class:`router.student.Student` contract)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, device: str = "cpu", embedder: Any = None):
        from router.embedding import Embedder, get_embedder

        self.directory = Path(directory)
        self.manifest = manifest
        self.kind = str(manifest["kind"])
        self.route = str(manifest.get("route", ""))
        self.version = int(manifest.get("version", 0))
        try:
            self.model, body = LabelModel.load(self.directory)
        except (OSError, KeyError, ValueError) as exc:
            raise StudentError(f"Cannot load the {self.kind} student in {self.directory}: {exc}") from exc
        encoder = body.get("encoder")
        if embedder is not None:
            self.embedder = embedder
        elif encoder:
            # A fine-tuned encoder belongs to this version only: not shared through the cache.
            self.embedder = Embedder(str(self.directory / encoder), device=device)
        else:
            self.embedder = get_embedder(body["embedder"], device=device)
        self.embedding_key = str(body.get("embedding_key") or self.embedder.name)

    def warm(self) -> None:
        """Load the encoder weights now rather than on the first request."""
        self.embedder.encode(["warm up"])

    def predict(self, messages: list[dict[str, Any]], params: dict[str, Any] | None = None) -> StudentOutput:
        """Answer one request: the teacher-formatted answer and its calibrated confidence."""
        return self.predict_batch([messages])[0]

    def predict_batch(self, requests: list[list[dict[str, Any]]]) -> list[StudentOutput]:
        """Answer several requests in one encoder pass (used for evaluation)."""
        t0 = time.perf_counter()
        texts = [self.model.text_of(m) for m in requests]
        X = self.embedder.encode(texts)
        answers, raw, servable, _ = self.model.decide(X, texts)
        conf = self.model.confidence(raw, servable)
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(requests))
        return [
            StudentOutput(
                text=answers[i],
                confidence=float(conf[i]),
                version=self.version,
                prompt_tokens=0,
                completion_tokens=0,
                embedding=X[i].astype("<f4").tobytes(),
                embedding_model=self.embedding_key,
                extra={"raw_score": float(raw[i]), "servable": bool(servable[i]), "latency_ms": ms},
            )
            for i in range(len(requests))
        ]

    def close(self) -> None:
        self.embedder = None  # type: ignore[assignment]


def load_label_student(directory: Path, manifest: dict[str, Any], **options: Any) -> LabelStudent:
    """Loader registered for kinds "label" and "structured"."""
    return LabelStudent(directory, manifest, **options)


register_kind("label", load_label_student)
register_kind("structured", load_label_student)
