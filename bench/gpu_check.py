"""``kdgate bench gpu-check``: LM-student training speed on CPU and, when there is one, on CUDA.

Trains the tiny test model (~0.14M parameters) and a small one (~25M) for a fixed number of steps
on each device, from a base model built locally (:mod:`bench.tiny`): nothing is downloaded.
``bench/gpu_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["SIZES", "gpu_check"]

SIZES: dict[str, dict[str, int]] = {
    # the model tests and the bench use (~0.14M parameters)
    "tiny": {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 192, "steps": 150},
    # a ~25M-parameter model, where a GPU has enough work to show
    "small": {"hidden_size": 512, "layers": 8, "heads": 8, "intermediate_size": 1536, "steps": 30},
}


def gpu_check(sizes: tuple[str, ...] = ("tiny", "small"), examples: int = 480) -> dict[str, Any]:
    """Train tiny/small models for a fixed number of steps on CPU and, when present, on CUDA.

    Returns seconds per device and size, and ``speedup`` (CPU seconds / CUDA seconds) per size.
    The tiny model runs on one CPU thread (its preset: faster than several for such small matrices);
    the small one uses torch's default thread count. ValueError for a size not in :data:`SIZES`.
    """
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; known: {sorted(SIZES)}")
    import torch
    from transformers import AutoTokenizer

    from bench import synthetic
    from bench.tiny import build_tiny_model
    from distiller.lm.config import preset
    from distiller.lm.data import build_examples
    from distiller.lm.train import train_lm

    items = synthetic.examples(examples)
    result: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        result["cuda_device"] = torch.cuda.get_device_name(0)
    corpus = [f"{synthetic.SYSTEM_PROMPT} {e.messages[-1]['content']} {e.answer}" for e in items]
    pairs = [SimpleNamespace(messages=e.messages, answer=e.answer, teacher_logprobs=None) for e in items]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            dims = dict(SIZES[size])
            steps = dims.pop("steps")
            base = build_tiny_model(Path(tmp) / size, corpus, **dims)
            exs, _ = build_examples(AutoTokenizer.from_pretrained(base), pairs, max_seq_len=128, use_teacher_logprobs=False)
            entry: dict[str, Any] = {"steps": steps}
            for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
                cfg = dataclasses.replace(
                    preset("tiny-cpu"),
                    base_model=str(base),
                    max_steps=steps,
                    device=device,
                    checkpoint_every=0,
                    progress=False,
                    torch_threads=1 if (size == "tiny" and device == "cpu") else None,
                    learning_rate=5e-3 if size == "tiny" else 1e-3,
                )
                r = train_lm(cfg, exs, Path(tmp) / f"work-{size}-{device}")
                entry[f"{device}_seconds"] = round(r.seconds, 3)
                entry[f"{device}_final_loss"] = round(r.losses[-1], 4)
            if "cuda_seconds" in entry:
                entry["speedup"] = round(entry["cpu_seconds"] / entry["cuda_seconds"], 2)
            result[size] = entry
    return result
