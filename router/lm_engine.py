"""An LM student's engine: one loaded artifact (base model + LoRA adapter, or full weights) that
generates a batch of chats and returns per-token OpenAI-format logprobs. torch and transformers are
imported only when a model is loaded."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.student import StudentError

__all__ = ["Generation", "LMEngine", "apply_stop", "pick_device"]

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One generated answer: text, OpenAI-format logprob entries, the chosen tokens' logprobs."""

    text: str
    logprobs: list[dict[str, Any]]
    token_logprobs: list[float]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def apply_stop(gen: Generation, stop: str | list[str] | None, tokenizer: Any = None) -> Generation:
    """Cut a generation at the first stop string (OpenAI semantics: the stop text is not returned)."""
    if not stop:
        return gen
    stops = [stop] if isinstance(stop, str) else list(stop)
    cut = min((gen.text.find(s) for s in stops if s and s in gen.text), default=-1)
    if cut < 0:
        return gen
    text = gen.text[:cut]
    kept, length = 0, 0
    for entry in gen.logprobs:
        if length >= cut:
            break
        length += len(entry["token"])
        kept += 1
    return Generation(
        text=text,
        logprobs=gen.logprobs[:kept],
        token_logprobs=gen.token_logprobs[:kept],
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=kept,
        finish_reason="stop",
    )


def pick_device(requested: str | None = None) -> str:
    """``requested`` if given, else CUDA when present, else CPU."""
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class LMEngine:
    """A loaded LM: base model (+ LoRA adapter merged in, or full weights) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str, version: int = 0, manifest: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.version = version
        self.manifest = manifest or {}
        self.lock = threading.Lock()  # one generate() at a time per engine
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    @classmethod
    def from_parts(
        cls,
        *,
        base_model: str,
        adapter_dir: str | Path | None = None,
        model_dir: str | Path | None = None,
        tokenizer_dir: str | Path | None = None,
        device: str | None = None,
        dtype: str = "auto",
        version: int = 0,
        manifest: dict | None = None,
    ) -> "LMEngine":
        """Load full weights from ``model_dir``, or ``base_model`` with the LoRA adapter in ``adapter_dir``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(device)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if model_dir is None:
            from router.lm_base import resolve_base

            base_model = resolve_base(base_model).path  # a packaged name is read from the converted cache
        source = str(model_dir) if model_dir is not None else base_model
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            model = model.merge_and_unload()  # merged: generation costs the same as the base model
        model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir) if tokenizer_dir else source)
        return cls(model, tokenizer, device=device, version=version, manifest=manifest)

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], *, device: str | None = None) -> "LMEngine":
        """Load the model an ``lm`` artifact describes (its files already verified by load_manifest)."""
        weights = manifest.get("weights")
        parts = {"adapter": {"adapter_dir": directory / "adapter"}, "full": {"model_dir": directory / "model"}}
        if weights not in parts:
            raise StudentError(f"The lm artifact in {directory} has unknown weights {weights!r} (want 'adapter' or 'full').")
        return cls.from_parts(
            base_model=manifest["base_model"],
            tokenizer_dir=directory / "tokenizer",
            device=device,
            version=int(manifest.get("version", 0)),
            manifest=manifest,
            **parts[weights],
        )

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        chats: Sequence[Sequence[dict[str, Any]]],
        *,
        max_tokens: Sequence[int] | int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_logprobs: int = 0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Generate answers for ``chats`` in one batch; greedy when ``temperature`` is 0.

        Logprobs are those of the model's raw distribution (before temperature), as vLLM reports
        them by default; ``top_logprobs`` alternatives come from the same distribution.
        """
        import torch

        n = len(chats)
        if n == 0:
            return []
        limits = [int(max_tokens)] * n if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
        texts = [self.render(c) for c in chats]
        enc = self.tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        input_ids = enc["input_ids"].to(self.device)
        attention = enc["attention_mask"].to(self.device)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(1, max(limits)),
            do_sample=temperature > 0,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if temperature > 0:
            kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            # an explicit greedy config: base models may ship sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with self.lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = out.sequences[:, input_ids.shape[1] :]
        logps = torch.stack(out.logits, dim=1).float().log_softmax(dim=-1)  # [batch, steps, vocab]
        eos = set(self.eos_ids)
        results = []
        for i in range(n):
            ids: list[int] = []
            entries: list[dict[str, Any]] = []
            chosen: list[float] = []
            finish = "length"
            for step in range(min(limits[i], new_tokens.shape[1])):
                tid = int(new_tokens[i, step])
                if tid in eos:
                    finish = "stop"
                    break
                lp = float(logps[i, step, tid])
                entry = self._entry(tid, lp)
                if top_logprobs:
                    values, indices = logps[i, step].topk(int(top_logprobs))
                    entry["top_logprobs"] = [self._entry(int(t), float(v)) for v, t in zip(values, indices)]
                else:
                    entry["top_logprobs"] = []
                ids.append(tid)
                entries.append(entry)
                chosen.append(lp)
            results.append(
                Generation(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    logprobs=entries,
                    token_logprobs=chosen,
                    prompt_tokens=int(prompt_lens[i]),
                    completion_tokens=len(ids),
                    finish_reason=finish,
                )
            )
        return results

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
