"""Hyperparameters of an LM student, as one dataclass with named presets.

Every key is declared once, with its default; :meth:`LMTrainConfig.from_dict` refuses keys it does
not know, so a typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["LMTrainConfig", "ConfigError", "PRESETS", "preset", "check_known"]


class ConfigError(ValueError):
    """An LM training configuration is invalid (unknown key, unknown preset, bad value)."""


def check_known(cls: type, data: dict[str, Any], what: str) -> None:
    """Raise ConfigError naming the keys of ``data`` that are not fields of the dataclass ``cls``
    (with the closest known name for each), so a typo fails when settings are read."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"Unknown {what}(s): {', '.join(hints)}. Known settings: {', '.join(sorted(known))}.")


@dataclass
class LMTrainConfig:
    """How to fine-tune one LM student. Defaults suit a small LoRA run on a real base model."""

    base_model: str = ""  # a packaged base (smollm2-135m, gemma3-270m), a Hugging Face model id or a local directory
    # -- what kind of LM student
    answer_grammar: str = "auto"  # "auto": a JSON extraction route the answer grammar covers gets a structured
    # student (distiller.lm.structured); "off": always the free-text student
    structured: dict[str, Any] = dataclasses.field(default_factory=dict)  # StructuredConfig overrides
    time_budget_s: float = 0.0  # most seconds of training (0: the structured student's default, 30 min; none for free text)
    # -- adaptation
    method: str = "lora"  # "lora" | "full" (full fine-tuning: only sensible for tiny models)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    # -- optimisation
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_seq_len: int = 1024
    seed: int = 0
    # -- distillation
    kl_weight: float = 0.5  # weight of the token-level KL term when teacher top_logprobs match
    kl_temperature: float = 1.0
    token_kl: str = "auto"  # "auto" (use when the tokenizers match) | "off"
    # -- data
    val_fraction: float = 0.2  # newest exchanges are held out for validation
    min_val_pairs: int = 20
    max_pairs: int | None = None
    # -- evaluation and calibration
    target_agreement: float | None = None  # default: the route's setting, else 0.98
    prompt_embedding: bool = True  # feed the prompt's embedding (PCA-reduced) to the calibrator
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_components: int = 4
    calibration_samples: int = 2  # extra sampled generations per val prompt when negatives are scarce
    judge_sample: int = 0  # how many val pairs to send to the teacher as a judge (0: never)
    max_new_tokens: int = 256
    eval_batch_size: int = 16
    # -- runtime
    device: str = "auto"  # "auto" (CUDA when present) | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "float32" | "bfloat16" | "float16"
    torch_threads: int | None = None  # CPU threads for torch (None: torch's default); 1 suits tiny models
    checkpoint_every: int = 200  # steps; 0 disables checkpoints
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method must be 'lora' or 'full', not {self.method!r}.")
        if self.token_kl not in ("auto", "off"):
            raise ConfigError(f"token_kl must be 'auto' or 'off', not {self.token_kl!r}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.answer_grammar not in ("auto", "off"):
            raise ConfigError(f"answer_grammar must be 'auto' or 'off', not {self.answer_grammar!r}.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be at least 1.")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, preset_name: str | None = None) -> "LMTrainConfig":
        """Build a config from ``data`` (over a preset if named); unknown keys raise ConfigError."""
        check_known(cls, data, "LM training setting")
        base = preset(preset_name) if preset_name else cls()
        return dataclasses.replace(base, **data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A stable hash of the settings that shape training (used to refuse a mismatched resume)."""
        shaping = {k: v for k, v in self.to_dict().items() if k not in ("progress", "checkpoint_every", "device", "torch_threads")}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    # The locally built tiny model (bench.tiny): full fine-tuning from random init, on CPU.
    "tiny-cpu": dict(
        method="full",
        epochs=15.0,
        batch_size=16,
        learning_rate=5e-3,
        warmup_ratio=0.05,
        weight_decay=0.0,
        max_seq_len=128,
        max_new_tokens=32,
        eval_batch_size=64,
        checkpoint_every=100,
        kl_weight=0.5,
        # tiny matrices: one thread avoids synchronisation that costs more than it saves (10x on a
        # busy 2-core machine)
        torch_threads=1,
    ),
    # A ~0.5B-1.5B instruct model with LoRA (fits a CPU slowly, a single GPU comfortably).
    "lora-small": dict(method="lora", lora_r=16, lora_alpha=32, epochs=3.0, batch_size=8, learning_rate=2e-4),
    # A 7B-class model with LoRA on one GPU.
    "lora-7b": dict(
        method="lora",
        lora_r=32,
        lora_alpha=64,
        epochs=2.0,
        batch_size=4,
        grad_accum=8,
        learning_rate=1e-4,
        max_seq_len=2048,
        dtype="bfloat16",
        device="cuda",
    ),
}


def preset(name: str) -> LMTrainConfig:
    """The named preset as a config; unknown names raise ConfigError listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown LM training preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.")
    return LMTrainConfig(**PRESETS[name])
