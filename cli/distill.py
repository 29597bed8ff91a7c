"""``kdgate distill`` (label and structured students) and ``kdgate distill-lm`` (LM students).

    kdgate distill --route R                 train one version now (progress bars), gate, promote
    kdgate distill --watch                   the worker: retrain after N new pairs or T minutes
    kdgate distill --route R --list          the route's versions with metrics and status
    kdgate distill --route R --promote V     make version V live (its artifact is verified first)
    kdgate distill --route R --rollback V    put an earlier version back live
    kdgate distill-lm --db D --route R --base-model M   distil a free-text route into an LM student
"""

from __future__ import annotations

import json as jsonlib
import sys
from typing import Annotated, Any

import typer

from cli.common import Json
from cli.output import fail, print_json, safe_text

__all__ = ["distill", "distill_lm", "distiller_config", "ConfigJson"]

ConfigJson = Annotated[str | None, typer.Option(
    "--config-json", help="distiller settings as a JSON object, e.g. '{\"min_pairs\": 100}'")]


def distiller_config(config_json: str | None, artifacts: str | None = None) -> Any:
    """A ``DistillerConfig`` from ``--config-json`` (and ``--artifacts``); exits 2 on a bad setting."""
    from distiller.config import ConfigError, DistillerConfig

    try:
        overrides = jsonlib.loads(config_json) if config_json else {}
        if not isinstance(overrides, dict):
            raise ConfigError("--config-json must be a JSON object")
        if artifacts:
            overrides["artifacts_dir"] = str(artifacts)
        return DistillerConfig.from_dict(overrides)
    except (ConfigError, ValueError) as exc:
        fail(f"distiller settings: {exc}", 2)


def _version_line(r: dict[str, Any]) -> str:
    m = r["metrics"]
    return (f"v{r['version']:<3} {r['status']:<9} {r['kind']:<10} train={r['train_pairs']:<6} "
            f"agreement={m.get('agreement', 0):.3f} coverage@{m.get('target_agreement', 0):.2f}="
            f"{m.get('coverage_at_target', 0):.3f} ece={m.get('ece', 0):.3f} encoder={m.get('encoder', '-')}")


def distill(
    route: Annotated[str | None, typer.Option(help="the route to act on")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="run the retraining worker until stopped")] = False,
    db: Annotated[str, typer.Option(help="ledger database")] = "kdgate.db",
    artifacts: Annotated[str | None, typer.Option(help="artifacts directory (default: <db directory>/artifacts)")] = None,
    config_json: ConfigJson = None,
    list_versions: Annotated[bool, typer.Option("--list", help="list the route's versions")] = False,
    promote: Annotated[int | None, typer.Option(metavar="VERSION", help="make VERSION live")] = None,
    rollback: Annotated[int | None, typer.Option(metavar="VERSION", help="put an earlier VERSION back live")] = None,
    json: Json = False,
) -> int:
    """Train, list, promote or roll back route students."""
    if sum((list_versions, promote is not None, rollback is not None)) > 1:
        fail("--list, --promote and --rollback are mutually exclusive", 2)
    config = distiller_config(config_json, artifacts)
    if watch:
        from distiller.worker import main as worker_main

        return worker_main(["--db", db, "--config-json", jsonlib.dumps(config.to_dict())])
    from distiller import registry
    from store import Ledger

    ledger = Ledger(db)
    if not route:
        print("kdgate: give --route R (or --watch). Routes with teacher traffic:", file=sys.stderr)
        for name, n in ledger.exchange_counts().items():
            print(f"  {safe_text(name)} ({n} exchanges)", file=sys.stderr)
        return 2
    try:
        if list_versions:
            rows = registry.list_students(ledger, route)
            if json:
                print_json(rows)
            elif not rows:
                print(f"route {route!r} has no student versions yet")
            else:
                print("\n".join(_version_line(r) for r in rows))
            return 0
        if promote is not None or rollback is not None:
            if promote is not None:
                row = registry.promote(ledger, route, promote, actor="cli", reason="manual promotion")
                message = f"route {route!r}: version {row['version']} is live"
            else:
                row = registry.rollback(ledger, route, rollback)
                message = f"route {route!r}: rolled back to version {row['version']}"
            print_json(row) if json else print(message)
            return 0
    except registry.RegistryError as exc:
        fail(str(exc))
    from distiller.pipeline import distill_route

    report = distill_route(ledger, route, config, progress=True)
    if json:
        print(report.message, file=sys.stderr)
        print_json(report.to_dict())
    else:
        print(report.message)
    return 0 if report.status in ("trained", "insufficient", "free_text") else 1


def distill_lm(
    db: Annotated[str, typer.Option(help="ledger database")],
    route: Annotated[str, typer.Option(help="the free-text route to distil")],
    base_model: Annotated[str | None, typer.Option(help="Hugging Face model id or local path")] = None,
    preset: Annotated[str, typer.Option(help="LM training preset (see distiller.lm.config)")] = "lora-small",
    config_json: Annotated[str | None, typer.Option("--config-json", help="JSON object of LMTrainConfig overrides")] = None,
    artifacts: Annotated[str | None, typer.Option(help="artifacts directory")] = None,
    work_dir: Annotated[str | None, typer.Option(help="checkpoints go here; rerun with the same dir to resume")] = None,
    json: Json = False,
) -> None:
    """Distil one free-text route into an LM student now; prints the run's summary as JSON."""
    import dataclasses

    from distiller.lm.config import ConfigError, LMTrainConfig
    from distiller.lm.train import distill_lm_route

    try:
        overrides = jsonlib.loads(config_json) if config_json else {}
        config = LMTrainConfig.from_dict(overrides, preset_name=preset)
        if base_model:
            config = dataclasses.replace(config, base_model=base_model)
    except (ConfigError, ValueError) as exc:
        fail(f"LM settings: {exc}", 2)
    print_json(distill_lm_route(db, route, config, artifacts_dir=artifacts, work_dir=work_dir))
