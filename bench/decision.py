"""``kdgate bench decision``: what the router's student-or-teacher decision costs as prompts grow.

Most of a label student's decision is its sentence encoder, whose work grows with the prompt's
tokens up to the encoder's cap (``max_seq_length``: 256 for all-MiniLM-L6-v2, 64 for an encoder the
distiller fine-tuned). For each prompt length, requests of that many tokens are built from the
stream's own texts (consecutive requests joined until long enough, so the words are real), and the
encoder is timed one request at a time on each runtime (PyTorch, ONNX Runtime), in alternating
blocks so both see the same machine. With ``--artifact`` the whole decision of a trained student
(features, heads, neighbours, calibrated confidence) is timed as well.

The share of the stream's own requests longer than each length says what a cap at that length
would truncate.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["LENGTHS", "format_table", "run_decision"]

LENGTHS = (16, 32, 64, 128, 256)
BLOCK = 10  # requests per runtime before switching


def _texts_of(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        users = [m.get("content") for m in r["messages"] if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if users:
            out.append(users[-1])
    return out


def _requests_of_length(texts: list[str], tokenizer: Any, length: int, n: int) -> list[str]:
    """``n`` texts of at least ``length`` tokens (the encoder truncates at its cap), each built by
    joining consecutive requests of the stream."""
    out, i = [], 0
    while len(out) < n and i < len(texts) * 4:
        parts, count = [], 0
        while count < length:
            t = texts[i % len(texts)]
            parts.append(t)
            count += len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1
            i += 1
        out.append(" ".join(parts))
    return out


def _time(fn: Any, items: list[str]) -> list[float]:
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run_decision(rows: list[dict[str, Any]], *, requests: int = 60, artifact: Path | None = None,
                 lengths: tuple[int, ...] = LENGTHS, progress: bool = True) -> dict[str, Any]:
    import torch

    from router import embedding

    texts = _texts_of(rows)
    if not texts:
        raise ValueError("the stream has no user messages to build requests from")
    enc = embedding.Embedder(embedding.DEFAULT_MODEL)
    tok = enc.model.tokenizer
    cap = int(enc.model.max_seq_length or 512)
    before = embedding._runtime
    embedding.prepare_serving_process("onnx")  # exports (or finds) the ONNX encoder
    runtimes = ["torch", "onnx"] if enc.runtime == "onnx" else ["torch"]

    student = None
    if artifact is not None:
        from router.student import load_student

        student = load_student(str(artifact))  # the manifest's own file hashes are still verified

    lengths_tok = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    result: dict[str, Any] = {
        "encoder": enc.name, "encoder_cap_tokens": cap, "torch_threads": torch.get_num_threads(),
        "requests_per_point": requests, "runtimes": runtimes,
        "stream_tokens": {"p50": int(statistics.median(lengths_tok)), "max": max(lengths_tok)},
        "share_longer_than": {str(n): round(sum(x > n for x in lengths_tok) / len(lengths_tok), 4) for n in lengths},
        "points": [],
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths), desc="decision", unit="length")
    try:
        for length in lengths:
            items = _requests_of_length(texts, tok, length, requests)
            encoder_ms: dict[str, list[float]] = {r: [] for r in runtimes}
            decision_ms: dict[str, list[float]] = {r: [] for r in runtimes}
            for runtime in runtimes:  # warm-up
                embedding._runtime = runtime
                _time(lambda x: enc.encode([x]), items[:5])
                if student is not None:
                    _time(lambda x: student.predict([{"role": "user", "content": x}], {}), items[:5])
            for start in range(0, len(items), BLOCK):
                block = items[start:start + BLOCK]
                for runtime in runtimes:
                    embedding._runtime = runtime
                    encoder_ms[runtime] += _time(lambda x: enc.encode([x]), block)
                    if student is not None:
                        decision_ms[runtime] += _time(
                            lambda x: student.predict([{"role": "user", "content": x}], {}), block)
            point: dict[str, Any] = {
                "tokens": min(length, cap),
                "encoder_p50_ms": {r: round(statistics.median(v), 2) for r, v in encoder_ms.items()},
            }
            if student is not None:
                point["decision_p50_ms"] = {r: round(statistics.median(v), 2) for r, v in decision_ms.items()}
            result["points"].append(point)
            if bar is not None:
                bar.update(1)
    finally:
        embedding._runtime = before
        if bar is not None:
            bar.close()
        if student is not None:
            student.close()
    return result


def format_table(result: dict[str, Any]) -> str:
    runtimes = result["runtimes"]
    head = f"{'tokens':>7}" + "".join(f"{'encoder ' + r:>16}" for r in runtimes)
    with_decision = any("decision_p50_ms" in p for p in result["points"])
    if with_decision:
        head += "".join(f"{'decision ' + r:>17}" for r in runtimes)
    lines = [f"encoder {result['encoder']} (cap {result['encoder_cap_tokens']} tokens), {result['torch_threads']} threads, "
             f"p50 ms over {result['requests_per_point']} requests per length", head]
    for p in result["points"]:
        line = f"{p['tokens']:>7}" + "".join(f"{p['encoder_p50_ms'][r]:>16.2f}" for r in runtimes)
        if with_decision:
            line += "".join(f"{p['decision_p50_ms'][r]:>17.2f}" for r in runtimes)
        lines.append(line)
    share = ", ".join(f">{k}: {v:.1%}" for k, v in result["share_longer_than"].items())
    lines.append(f"the stream's own requests: p50 {result['stream_tokens']['p50']} tokens, max {result['stream_tokens']['max']}; "
                 f"longer than {share}")
    return "\n".join(lines)
