"""``kdgate bench ...`` and ``kdgate demo``: the benchmarks of :mod:`bench`, results under bench/results/.

Each command checks its flags, calls one ``bench`` function and prints what it returns; the bench
modules (and what they pull in: numpy, torch, openai) are imported only by the command that runs.
"""

from __future__ import annotations

import json as jsonlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli.common import Json, dataset_paths
from cli.distill import ConfigJson, distiller_config
from cli.output import fail, print_json

__all__ = ["app", "demo"]

app = typer.Typer(help="benchmarks; results under bench/results/", no_args_is_help=True)

JsonAlways = Annotated[bool, typer.Option("--json", help="machine-readable output (this command prints one JSON document either way)")]
Out = Annotated[Path | None, typer.Option(help="also write the JSON here")]


@app.command("overhead")
def overhead(
    out: Out = None,
    requests: Annotated[int, typer.Option(help="sequential requests at concurrency 1")] = 500,
    seconds: Annotated[float, typer.Option(help="duration at concurrency 32")] = 10.0,
    no_litellm: Annotated[bool, typer.Option("--no-litellm", help="skip LiteLLM's proxy")] = False,
    db: Annotated[list[str] | None, typer.Option(
        "--db", help="also measure kdgate on this ledger, side by side with SQLite: a postgresql:// DSN, or "
                     "'postgresql' for a temporary local server")] = None,
    surface: Annotated[list[str] | None, typer.Option(
        "--surface", help="also measure this surface beside chat in the same run: responses or messages (repeatable)")] = None,
    json: JsonAlways = False,
) -> None:
    """Latency/throughput added by kdgate vs the upstream and LiteLLM's proxy."""
    from bench.overhead import SURFACES, run_overhead

    unknown = [x for x in surface or () if x not in SURFACES]
    if unknown:
        fail(f"bench overhead: unknown surface {', '.join(unknown)} (choose from {', '.join(SURFACES)})", 2)
    print_json(run_overhead(out=out, requests_c1=requests, seconds_c32=seconds, include_litellm=not no_litellm,
                            dbs=tuple(db or ()), surfaces=tuple(surface or ())))


@app.command("replicas")
def replicas(
    replicas: Annotated[str, typer.Option("--replicas", help="replica counts to measure, comma-separated")] = "1,2",
    db: Annotated[str | None, typer.Option(help="a postgresql:// DSN (default: a temporary local server)")] = None,
    seconds: Annotated[float, typer.Option(help="load duration per replica count")] = 15.0,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 32,
    out: Out = None,
    json: JsonAlways = False,
) -> None:
    """Throughput and latency of N gateway replicas on one PostgreSQL ledger; exchanges lost."""
    from bench.overhead import run_replicas

    counts = tuple(int(x) for x in replicas.split(",") if x.strip())
    print_json(run_replicas(replicas=counts, db=db, seconds=seconds, concurrency=concurrency, out=out))


@app.command("replay")
def replay(
    dataset: Annotated[list[Path], typer.Option(
        help="JSONL stream: {messages, answer} per line; repeated: several tasks interleaved at random as one "
             "stream, each its own route (named by its file), --limit per task")],
    out: Out = None,
    teacher_model: Annotated[str, typer.Option(help="whose prices the stand-in teacher charges")] = "gpt-4o",
    rate: Annotated[float, typer.Option(help="requests per second (0: as fast as answered)")] = 25.0,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 4,
    limit: Annotated[int | None, typer.Option(help="replay only the first N requests")] = None,
    target_agreement: Annotated[float, typer.Option(help="the route's target agreement (for the student's own answers)")] = 0.98,
    target_confidence: Annotated[float | None, typer.Option(
        help="how sure the router must be that a version meets the target before it serves (default 0.95)")] = None,
    shadow_rate: Annotated[float, typer.Option(
        help="share of student answers also sent to the teacher to measure live agreement")] = 0.02,
    score_versions: Annotated[bool, typer.Option(
        "--score-versions", help="after the run, score every student version on the last quarter of its route's answers (version_scores)")] = False,
    name: Annotated[str | None, typer.Option(help="results name (default: from the path)")] = None,
    config_json: Annotated[str | None, typer.Option(
        "--config-json", help="distiller settings as a JSON object, e.g. '{\"min_val_checks\": 150}'")] = None,
    paced: Annotated[bool, typer.Option(
        "--paced", help="the stream waits while the distiller trains (its wall time does not count): sample efficiency, "
                        "whatever the CPU")] = False,
    ceiling: Annotated[str, typer.Option(
        help="the last quarter's ceiling share for ceiling_ratio: 'auto' (train the route's student family on every "
             "earlier answer; cached under bench/results), 'off', or a share such as 0.9028")] = "auto",
    json: Json = False,
) -> None:
    """Replay a request stream through the live gateway with a stand-in teacher."""
    if not 0.0 <= shadow_rate <= 1.0:
        fail("--shadow-rate must be between 0 and 1", 2)
    if target_confidence is not None and not 0.5 <= target_confidence < 1.0:
        fail("--target-confidence must be at least 0.5 and below 1", 2)
    from bench.replay import (
        distiller_overrides,
        format_table,
        load_stream,
        mix_streams,
        run_replay,
        stream_name,
    )

    try:
        distiller = distiller_overrides(config_json)
        if len(dataset) == 1:
            rows = load_stream(dataset[0], limit)
        else:
            rows = mix_streams([(stream_name(p), load_stream(p, limit)) for p in dataset])
    except (OSError, ValueError) as exc:
        fail(str(exc), 2)
    route_settings = {"target_agreement": target_agreement, "shadow_rate": shadow_rate}
    if target_confidence is not None:
        route_settings["target_confidence"] = target_confidence
    name = name or "+".join(stream_name(p) for p in dataset)
    if ceiling == "auto":
        ceiling_arg: bool | float = True
    elif ceiling == "off":
        ceiling_arg = False
    else:
        try:
            ceiling_arg = float(ceiling)
        except ValueError:
            fail("--ceiling: 'auto', 'off' or a share in (0, 1]", 2)
        if len(dataset) > 1:
            fail("--ceiling: a share is one stream's; with several --dataset use 'auto' (each route's own) or 'off'", 2)
    metrics, _ = run_replay(rows, name=name, out=out, teacher_model=teacher_model, rate=rate, concurrency=concurrency,
                            route_settings=route_settings, distiller=distiller, score_versions_on_last_quarter=score_versions,
                            paced=paced, ceiling=ceiling_arg)
    if json:
        print_json(metrics)
    else:
        print(format_table(metrics))
        print(f"\nresults: bench/results/replay-{name}.json and .png")


@app.command("learning-curve", context_settings={"allow_extra_args": True})
def learning_curve(
    ctx: typer.Context,
    dataset: Annotated[list[Path], typer.Option(
        metavar="PATH.jsonl", help="request stream(s) ({\"messages\", \"answer\"} per line): --dataset A B ...; "
        "several files are concatenated in order")],
    out: Out = None,
    sizes: Annotated[str | None, typer.Option(help="comma-separated N values (default 250,500,1000,2000,5000,10000)")] = None,
    targets: Annotated[str | None, typer.Option(help="comma-separated agreements to report coverage at (default 0.95,0.98,0.99)")] = None,
    min_test: Annotated[int, typer.Option(help="fewest held-back pairs")] = 500,
    results_dir: Annotated[Path, typer.Option(help="where results go")] = Path("bench/results"),
    config_json: ConfigJson = None,
    json: Json = False,
) -> None:
    """Agreement and coverage as a route's data grows."""
    streams = dataset_paths(dataset, ctx)
    from bench.learning_curve import (
        check_targets,
        format_table,
        run_learning_curve,
        write_results,
    )

    config = distiller_config(config_json)
    kwargs: dict = {"config": config, "progress": True, "min_test": min_test}
    try:
        if sizes:
            kwargs["sizes"] = [int(s) for s in sizes.split(",")]
    except ValueError:
        fail(f"--sizes: comma-separated whole numbers expected, got {sizes!r}", 2)
    if targets:
        try:
            kwargs["targets"] = check_targets([float(t) for t in targets.split(",")])
        except ValueError:
            fail(f"--targets: comma-separated agreements in (0, 1] expected, got {targets!r}", 2)
    result = run_learning_curve(streams, **kwargs)
    path = write_results(result, results_dir=results_dir, out=out)
    _show(result, path, format_table, json)


@app.command("lm-student")
def lm_student(
    out: Annotated[Path, typer.Option(help="where to write the JSON result")],
    train_examples: Annotated[int, typer.Option(help="teacher pairs seeded into the ledger")] = 960,
    preset: Annotated[str, typer.Option(help="LM training preset")] = "tiny-cpu",
    config_json: Annotated[str | None, typer.Option("--config-json", help="JSON object of LMTrainConfig overrides")] = None,
    no_gateway: Annotated[bool, typer.Option("--no-gateway", help="time Student.predict directly instead of the gateway")] = False,
    json: Json = False,
) -> None:
    """Distil the synthetic free-text route into a tiny LM and serve it through the gateway."""
    from distiller.lm.config import ConfigError, LMTrainConfig

    try:
        config = LMTrainConfig.from_dict(jsonlib.loads(config_json) if config_json else {}, preset_name=preset)
    except (ConfigError, ValueError) as exc:
        fail(f"LM settings: {exc}", 2)
    from bench.lm_student import run_lm_student_bench

    result = run_lm_student_bench(out, train_examples=train_examples, config=config, through_gateway=not no_gateway)
    summary = {k: result[k] for k in ("exact_agreement", "auroc", "train_seconds", "student_p50_ms")}
    print_json(summary, indent=None)
    print(f"wrote {out} (student latency measured via {result['student_latency_path']})", file=sys.stderr if json else sys.stdout)


@app.command("gpu-check")
def gpu_check(
    sizes: Annotated[str, typer.Option(help="comma-separated: tiny, small")] = "tiny,small",
    json: JsonAlways = False,
) -> None:
    """Tiny-model training speed on CPU vs CUDA (bench/gpu_check.sh runs it on a GPU machine)."""
    from bench.gpu_check import gpu_check as run_gpu_check

    try:
        print_json(run_gpu_check(sizes=tuple(s.strip() for s in sizes.split(",") if s.strip())))
    except ValueError as exc:
        fail(f"--sizes: {exc}", 2)


@app.command("soak")
def soak(
    minutes: Annotated[float, typer.Option(help="how long to hold the load")],
    teacher_only: Annotated[bool, typer.Option("--teacher-only", help="no student: the teacher answers everything")] = False,
    connections: Annotated[int, typer.Option(help="concurrent connections")] = 500,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here (always: bench/results/soak.json)")] = None,
    json: JsonAlways = False,
) -> int:
    """Hold many connections for minutes: errors, RSS over time, exchanges lost."""
    from bench.robust import run_soak

    res = run_soak(minutes=minutes, connections=connections, out=out, student=not teacher_only)
    print_json({k: v for k, v in res.items() if k != "rss_samples_mb"})
    return 0 if res["errors"] == 0 and res["lost"] == 0 else 1


@app.command("crash")
def crash(
    out: Annotated[Path | None, typer.Option(help="also write the JSON here (always: bench/results/crash.json)")] = None,
    seconds: Annotated[float, typer.Option(help="load before the kill")] = 20.0,
    connections: Annotated[int, typer.Option(help="concurrent connections")] = 100,
    flush_ms: Annotated[float, typer.Option(help="the gateway's ledger_flush_ms")] = 50.0,
    json: JsonAlways = False,
) -> int:
    """Kill -9 the gateway under load, then count the ledger."""
    from bench.robust import run_crash

    res = run_crash(seconds=seconds, connections=connections, out=out, flush_ms=flush_ms)
    print_json(res)
    return 0 if res["integrity_ok"] and res["lost_before_last_flush"] == 0 else 1


@app.command("dashboard")
def dashboard(
    rows: Annotated[int, typer.Option(help="synthetic exchanges to seed")] = 1_000_000,
    out: Annotated[Path, typer.Option(help="where to write the JSON result")] = Path("bench/results/dashboard.json"),
    db: Annotated[str | None, typer.Option(help="ledger to seed (default: a fresh temporary file)")] = None,
    routes: Annotated[int, typer.Option(help="routes to spread the rows over")] = 12,
    days: Annotated[int, typer.Option(help="days of history to spread the rows over")] = 60,
    repeat: Annotated[int, typer.Option(help="timed runs per query; the slowest is reported")] = 5,
    json: JsonAlways = False,
) -> None:
    """Time the dashboard's overview and routes-table queries on a big ledger."""
    from bench.dashboard import TARGET_MS, run_dashboard

    result = run_dashboard(rows=rows, out=out, db=db, routes=routes, days=days, repeat=repeat)
    print_json(result)
    if not (result["overview_ms"] < TARGET_MS and result["routes_ms"] < TARGET_MS):
        print(f"slower than the {TARGET_MS:g} ms target", file=sys.stderr)


def demo(
    port: Annotated[int, typer.Option(help="the gateway's port")] = 8000,
    limit: Annotated[int | None, typer.Option(help="replay only the first N requests")] = None,
    rate: Annotated[float, typer.Option(help="requests per second")] = 40.0,
    unpaced: Annotated[bool, typer.Option(
        "--unpaced", help="do not hold the stream while the distiller retrains (on a slow machine the route then "
                          "pays the teacher for every request that arrives meanwhile)")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="stop the gateway after the table instead of leaving it running")] = False,
    directory: Annotated[Path, typer.Option("--dir", help="where the demo's ledger and students go")] = Path("kdgate-demo"),
    dataset: Annotated[Path | None, typer.Option(
        metavar="STREAM.jsonl", help="replay this stream ({messages, answer} per line) instead of the bundled banking77")] = None,
    lm_base_model: Annotated[str | None, typer.Option(
        help="distiller.lm_base_model: extraction routes get an LM student on this base (smollm2-135m, gemma3-270m, "
             "a hub id or a local path); the stream then waits while it trains")] = None,
    target_agreement: Annotated[float, typer.Option(help="the route's target agreement")] = 0.98,
    config_json: ConfigJson = None,
    json: Json = False,
) -> None:
    """Replay the bundled banking77 stream (or --dataset) through a local gateway, then leave it running."""
    import secrets
    import time

    from bench.replay import demo_stream, distiller_overrides, format_table, load_stream, pacing_text, run_replay, stream_name

    if not 0.5 <= target_agreement < 1.0:
        fail("--target-agreement must be at least 0.5 and below 1", 2)
    try:
        distiller = distiller_overrides(config_json, {"lm_base_model": lm_base_model} if lm_base_model else None)
        rows = load_stream(dataset, limit) if dataset else demo_stream(limit)
    except (OSError, ValueError) as exc:
        fail(str(exc), 2)
    info = sys.stderr if json else sys.stdout
    admin_key = secrets.token_hex(16)
    # an LM student trains for minutes, not seconds: hold the stream for the whole of its training
    paced: bool | str = False if unpaced else (True if distiller.get("lm_base_model") else "heads")
    print(f"kdgate demo: {len(rows)} {dataset or 'banking77'} requests through a local gateway; the teacher is a stand-in "
          f"that replays the data set's answers at gpt-4o prices. Pacing: {pacing_text(paced, rate)}.", file=info)
    metrics, stack = run_replay(rows, name=f"demo-{stream_name(dataset) if dataset else 'banking77'}", rate=rate, port=port,
                                workdir=directory.resolve(), keep_running=not no_wait, admin_key=admin_key,
                                route_settings={"target_agreement": target_agreement}, distiller=distiller, paced=paced,
                                results_dir=directory.resolve())  # beside its ledger, not in the caller's folder
    print_json(metrics) if json else print(format_table(metrics))
    if stack is None:
        return
    try:
        print(f"\nThe gateway is still running at {stack.base_url} (OpenAI-compatible, no key needed).", file=info)
        print(f"Dashboard: {stack.url}/dashboard  (admin key for this demo: {admin_key})", file=info)
        print("Ctrl-C stops it.", file=info, flush=True)
        while stack.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


@app.command("decision", context_settings={"allow_extra_args": True})
def decision(
    ctx: typer.Context,
    dataset: Annotated[list[Path], typer.Option(help="JSONL stream whose user texts build the requests")],
    artifact: Annotated[Path | None, typer.Option(
        help="a label student's artifact directory: time its whole decision too, not only the encoder")] = None,
    requests: Annotated[int, typer.Option(help="requests timed per prompt length and runtime")] = 60,
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "16,32,64,128,256",
    name: Annotated[str, typer.Option(help="results name")] = "decision",
    out: Out = None,
    json: Json = False,
) -> None:
    """The router's decision as prompts grow: the student encoder on PyTorch vs ONNX Runtime."""
    from bench.decision import format_table, run_decision
    from bench.replay import load_stream
    from bench.stack import write_results

    paths = dataset_paths(dataset, ctx)
    try:
        rows = [r for p in paths for r in load_stream(p)]
        length_list = tuple(int(x) for x in lengths.split(",") if x.strip())
    except (OSError, ValueError) as exc:
        fail(str(exc), 2)
    if not length_list or min(length_list) < 1 or requests < 1:
        fail("--lengths must be positive token counts and --requests at least 1", 2)
    if artifact is not None and not (artifact / "manifest.json").is_file():
        fail(f"--artifact: no student artifact (manifest.json) in {artifact}", 2)
    result = run_decision(rows, requests=requests, artifact=artifact, lengths=length_list)
    result["dataset"] = [str(p) for p in paths]
    path = write_results(result, name, out=out)
    _show(result, path, format_table, json)


@app.command("splits")
def splits(
    ledger: Annotated[str, typer.Option(help="a replay's ledger: SQLite path or postgresql:// DSN")],
    dataset: Annotated[Path, typer.Option(help="the JSONL stream that replay replayed (its teacher answers score the next requests)")],
    route: Annotated[str, typer.Option(help="the route in the ledger")] = "replay",
    cutoffs: Annotated[str, typer.Option(help="comma-separated requests to cut the ledger at")] = "3000,5000,7000,9000,11000",
    horizon: Annotated[int, typer.Option(help="requests after each cut that each candidate serves")] = 2000,
    split: Annotated[list[str] | None, typer.Option(
        "--split", help="a validation split to compare (repeatable; default all): newest, holdout, holdout-only, holdout-plain, holdout-norefit")] = None,
    config_json: ConfigJson = None,
    name: Annotated[str, typer.Option(help="results name")] = "splits",
    out: Out = None,
    json: Json = False,
) -> None:
    """Validation splits side by side on a replay's ledger: what each certifies, and serves of what came next."""
    from bench.replay import load_stream
    from bench.splits import SPLITS, format_table, run_splits
    from bench.stack import write_results
    from store import Ledger

    chosen = tuple(split or SPLITS)
    try:
        cuts = tuple(int(x) for x in cutoffs.split(",") if x.strip())
        rows = load_stream(dataset)
    except (OSError, ValueError) as exc:
        fail(str(exc), 2)
    if not cuts or min(cuts) < 1 or horizon < 1:
        fail("--cutoffs must be positive request counts and --horizon at least 1", 2)
    if not str(ledger).startswith("postgres") and not Path(ledger).is_file():
        fail(f"--ledger: no such file {ledger}", 2)
    config = distiller_config(config_json)
    try:
        result = run_splits(Ledger(ledger), route, rows, cutoffs=cuts, horizon=horizon, splits=chosen, config=config,
                            progress=not json)
    except ValueError as exc:
        fail(str(exc), 2)
    result.update(ledger=str(Path(ledger).name), dataset=str(dataset))
    path = write_results(result, name, out=out)
    _show(result, path, format_table, json)


def _show(result: dict, path: Path, table: Callable[[dict], str], json: bool) -> None:
    """A bench result on stdout: as JSON, or as its table and where the file was written."""
    if json:
        print_json(result)
    else:
        print(table(result))
        print(f"\nresults: {path}")
