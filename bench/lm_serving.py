"""``kdgate bench lm-serving``: one structured LM student served by each in-process decoder, side by side.

The same artifact (a student ``bench lm-curve --keep-artifacts`` kept, or one from the registry) is
loaded once per serving option, and every TEST request is answered by each option in turn, one
request at a time, the order rotating from request to request, so that a shared, noisy CPU weighs on
all options alike. Options (those this machine can run):

- ``lean``: the production decoder (:class:`router.lm_decode.FastLlama` / ``FastGemma``) with float32
  layers packed once for oneDNN;
- ``lean-plain``: the same with plain float32 ``Linear`` layers (what it ran before packing);
- ``lean-bf16``: packed bf16 layers, only where the CPU has bf16 kernels;
- ``hf``: the transformers model itself with its ``DynamicCache`` (:class:`router.lm_decode.HFDecoder`).

For each: ``p50_ms`` and ``p95_ms`` (template stripping to calibrated confidence, as a request is
served), the passes per answer, ``exact_agreement`` with TEST's teacher answers, and
``same_answers``: the share of answers equal to the first option's (packing must not change them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from distiller.dataset import examples_from_jsonl
from router.agreement import answers_agree

__all__ = ["OPTIONS", "run_lm_serving", "format_table", "write_results"]

# name: (decoder, weights)
OPTIONS: dict[str, tuple[str, str]] = {
    "lean": ("lean", "fp32"),
    "lean-plain": ("lean", "fp32-plain"),
    "lean-bf16": ("lean", "bf16"),
    "hf": ("hf", "fp32"),
}


def available_options() -> list[str]:
    """The options this machine runs: ``lean-bf16`` only with bf16 kernels, ``lean-plain`` only where
    ``lean`` is packed (else they are the same decoder)."""
    from router.lm_decode import bf16_packing_available, fp32_packing_available

    names = ["lean"]
    if fp32_packing_available():
        names.append("lean-plain")
    if bf16_packing_available():
        names.append("lean-bf16")
    return names + ["hf"]


def run_lm_serving(artifact: str | Path, test_path: str | Path, *, options: list[str] | None = None,
                   requests: int = 150, threads: int | None = 2, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns ``{"artifact", "base_model", "options": [{"name", "p50_ms", "p95_ms",
    "exact_agreement", "same_answers", ...}], ...}`` (see the module docstring)."""
    import torch

    from bench.lm_curve import cpu_info
    from router.artifact import load_manifest
    from router.lm_structured import KIND, load_structured_model

    manifest = load_manifest(artifact)
    if manifest.get("kind") != KIND:
        raise ValueError(f"{artifact} holds a {manifest.get('kind')!r} student; this bench serves {KIND} ones")
    names = options or available_options()
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown serving option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    test = examples_from_jsonl(test_path)[:requests]
    if not test:
        raise ValueError(f"{test_path} holds no pairs")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        models, loaded = {}, {}
        for name in names:
            decoder, weights = OPTIONS[name]
            t0 = time.perf_counter()
            models[name] = load_structured_model(artifact, manifest, device="cpu", weights=weights, decoder=decoder)
            loaded[name] = round(time.perf_counter() - t0, 1)
        texts = [models[names[0]].template.strip(e.messages) for e in test[:3]]
        for m in models.values():  # warm up
            for text in texts:
                m.confidence(m.decode([text]))
        ms: dict[str, list[float]] = {n: [] for n in names}
        answers: dict[str, list[str]] = {n: [] for n in names}
        passes: dict[str, list[int]] = {n: [] for n in names}
        from tqdm import tqdm

        for i, e in enumerate(tqdm(test, desc="lm-serving", unit="req", disable=not progress)):
            for name in names[i % len(names):] + names[:i % len(names)]:
                m = models[name]
                t0 = time.perf_counter()
                res = m.decode([m.template.strip(e.messages)])
                m.confidence(res)
                ms[name].append((time.perf_counter() - t0) * 1000)
                answers[name].append(res[0].text if res[0].complete else "")
                passes[name].append(res[0].passes)
        first = names[0]
        rows = []
        for name in names:
            engine = models[name].engine
            rows.append({
                "name": name, "decoder": type(engine).__name__, "weights": getattr(engine, "weights", None),
                "packed": getattr(engine, "packed", None), "load_seconds": loaded[name],
                "p50_ms": round(float(np.median(ms[name])), 1), "p95_ms": round(float(np.percentile(ms[name], 95)), 1),
                "passes_mean": float(np.mean(passes[name])),
                "exact_agreement": float(np.mean([bool(a) and answers_agree("json", a, e.answer)
                                                  for a, e in zip(answers[name], test)])),
                "same_answers": float(np.mean([a == b for a, b in zip(answers[name], answers[first])])),
            })
        for row in rows:
            row["p50_vs_first"] = round(row["p50_ms"] / rows[0]["p50_ms"], 3)
    finally:
        torch.set_num_threads(before)
    return {"artifact": str(artifact), "base_model": manifest.get("base_model"), "dataset": str(test_path),
            "requests": len(test), "threads": threads, "cpu": cpu_info(), "options": rows}


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    cpu = result["cpu"]
    lines = [
        f"lm-serving: {result['base_model']} student {result['artifact']} on {result['dataset']} "
        f"({result['requests']} requests one at a time, {result['threads']} thread(s), CPU {cpu['capability']}"
        f"{'' if cpu['bf16_kernels'] else ' without bf16 kernels'})",
        "",
        "| option | decoder | weights | p50 ms | p95 ms | p50 vs first | passes | exact agreement | same answers |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["options"]:
        weights = f"{r['weights']}{' packed' if r['packed'] else ''}" if r["weights"] != "hf" else "model's own"
        lines.append(f"| {r['name']} | {r['decoder']} | {weights} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p50_vs_first']:.2f}x | {r['passes_mean']:.2f} | {r['exact_agreement']:.1%} | "
                     f"{r['same_answers']:.1%} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out: Path) -> Path:
    """Write the JSON to ``out`` and the table beside it (same name, ``.md``)."""
    from bench.lm_curve import write_results as write

    return write(result, out, format_table)
