"""Command-line edge of LM students.

    kdgate bench lm-student --out FILE [--train-examples N] [--preset P] [--config-json J] [--no-gateway]
    python -m distiller.lm.cli distill --db kdgate.db --route R --base-model M [--preset P] [--config-json J]
    python -m distiller.lm.cli gpu-check [--sizes tiny,small]   training speed, CPU vs CUDA

The gateway's CLI calls :func:`register_bench`; each parser sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["register_bench", "main", "gpu_check"]


def _config(args: argparse.Namespace) -> Any:
    from distiller.lm.config import LMTrainConfig

    overrides = json.loads(args.config_json) if getattr(args, "config_json", None) else {}
    return LMTrainConfig.from_dict(overrides, preset_name=args.preset)


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.lm_student import run_lm_student_bench
    from distiller.lm.config import ConfigError

    try:
        config = _config(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_lm_student_bench(
        Path(args.out), train_examples=args.train_examples, config=config, through_gateway=not args.no_gateway
    )
    print(json.dumps({k: result[k] for k in ("exact_agreement", "auroc", "train_seconds", "student_p50_ms")}))
    print(f"wrote {args.out} (student latency measured via {result['student_latency_path']})")
    return 0


def register_bench(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``lm-student`` to ``kdgate bench``."""
    p = bench_subparsers.add_parser(
        "lm-student", help="distil the synthetic free-text route into a tiny LM and serve it through the gateway"
    )
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--train-examples", type=int, default=960, help="teacher pairs seeded into the ledger")
    p.add_argument("--preset", default="tiny-cpu", help="LM training preset (default tiny-cpu)")
    p.add_argument("--config-json", help="JSON object of LMTrainConfig overrides")
    p.add_argument("--no-gateway", action="store_true", help="time Student.predict directly instead of the gateway")
    p.set_defaults(func=_cmd_bench)
    return p


def _cmd_distill(args: argparse.Namespace) -> int:
    from distiller.lm.config import ConfigError
    from distiller.lm.train import distill_lm_route

    try:
        config = _config(args)
        if args.base_model:
            config = dataclasses.replace(config, base_model=args.base_model)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = distill_lm_route(args.db, args.route, config, artifacts_dir=args.artifacts, work_dir=args.work_dir)
    print(json.dumps(summary, indent=2, default=str))
    return 0


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
    the small one uses torch's default thread count.
    """
    import tempfile
    from types import SimpleNamespace

    import torch

    from bench import synthetic
    from distiller.lm.config import preset
    from distiller.lm.data import build_examples
    from bench.tiny import build_tiny_model
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
            from transformers import AutoTokenizer

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


def _cmd_gpu_check(args: argparse.Namespace) -> int:
    print(json.dumps(gpu_check(sizes=tuple(args.sizes.split(","))), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m distiller.lm.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks")
    register_bench(bench.add_subparsers(dest="bench", required=True))
    d = sub.add_parser("distill", help="distil one free-text route into an LM student now")
    d.add_argument("--db", required=True)
    d.add_argument("--route", required=True)
    d.add_argument("--base-model", help="Hugging Face model id or local path")
    d.add_argument("--preset", default="lora-small")
    d.add_argument("--config-json")
    d.add_argument("--artifacts")
    d.add_argument("--work-dir", help="checkpoints go here; rerun with the same dir to resume")
    d.set_defaults(func=_cmd_distill)
    g = sub.add_parser("gpu-check", help="tiny-model training speed on CPU vs CUDA")
    g.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small")
    g.set_defaults(func=_cmd_gpu_check)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
