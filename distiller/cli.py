"""Command-line edge of the distiller: ``kdgate distill`` and ``kdgate bench learning-curve``.

    kdgate distill --route R                 train one version now (progress bars), gate, promote
    kdgate distill --watch                   the worker: retrain after N new pairs or T minutes
    kdgate distill --route R --list          the route's versions with metrics and status
    kdgate distill --route R --promote V     make version V live (its artifact is verified first)
    kdgate distill --route R --rollback V    put an earlier version back live
    kdgate bench learning-curve --dataset train.jsonl [test.jsonl ...] [--sizes 250,500] [--out FILE]

The gateway's CLI calls :func:`register` and :func:`register_bench`; ``python -m distiller.cli``
runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "register_bench", "main"]


def _config(args: argparse.Namespace) -> Any:
    from distiller.config import DistillerConfig

    overrides = json.loads(args.config_json) if getattr(args, "config_json", None) else {}
    if getattr(args, "artifacts", None):
        overrides["artifacts_dir"] = str(args.artifacts)
    return DistillerConfig.from_dict(overrides)


def _cmd_distill(args: argparse.Namespace) -> int:
    from distiller import registry
    from distiller.config import ConfigError
    from store import Ledger

    try:
        config = _config(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ledger = Ledger(args.db)
    if args.watch:
        from distiller.worker import main as worker_main

        argv = ["--db", args.db, "--config-json", json.dumps(config.to_dict())]
        return worker_main(argv)
    if not args.route:
        print("error: give --route R (or --watch). Routes with teacher traffic:", file=sys.stderr)
        for route, n in ledger.exchange_counts().items():
            print(f"  {route} ({n} exchanges)", file=sys.stderr)
        return 2
    try:
        if args.list:
            rows = registry.list_students(ledger, args.route)
            if not rows:
                print(f"route {args.route!r} has no student versions yet")
            for r in rows:
                m = r["metrics"]
                print(
                    f"v{r['version']:<3} {r['status']:<9} {r['kind']:<10} train={r['train_pairs']:<6} "
                    f"agreement={m.get('agreement', 0):.3f} coverage@{m.get('target_agreement', 0):.2f}="
                    f"{m.get('coverage_at_target', 0):.3f} ece={m.get('ece', 0):.3f} encoder={m.get('encoder', '-')}"
                )
            return 0
        if args.promote is not None:
            row = registry.promote(ledger, args.route, args.promote, actor="cli", reason="manual promotion")
            print(f"route {args.route!r}: version {row['version']} is live")
            return 0
        if args.rollback is not None:
            row = registry.rollback(ledger, args.route, args.rollback)
            print(f"route {args.route!r}: rolled back to version {row['version']}")
            return 0
    except registry.RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from distiller.pipeline import distill_route

    report = distill_route(ledger, args.route, config, progress=True)
    print(report.message)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 0 if report.status in ("trained", "insufficient", "free_text") else 1


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distill`` to a parent parser's subparsers; sets ``func``."""
    p = subparsers.add_parser("distill", help="train, list, promote or roll back route students",
                              description=__doc__.split("\n\n")[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", help="the route to act on")
    p.add_argument("--watch", action="store_true", help="run the retraining worker until stopped")
    p.add_argument("--db", default="kdgate.db", help="ledger database (default: ./kdgate.db)")
    p.add_argument("--artifacts", help="artifacts directory (default: <db directory>/artifacts)")
    p.add_argument("--config-json", help="distiller settings as a JSON object, e.g. '{\"min_pairs\": 100}'")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="list the route's versions")
    group.add_argument("--promote", type=int, metavar="VERSION", help="make VERSION live")
    group.add_argument("--rollback", type=int, metavar="VERSION", help="put an earlier VERSION back live")
    p.add_argument("--json", action="store_true", help="also print the run's report as JSON")
    p.set_defaults(func=_cmd_distill)
    return p


def _cmd_learning_curve(args: argparse.Namespace) -> int:
    from bench.learning_curve import check_targets, format_table, run_learning_curve, write_results

    config = _config(args)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    kwargs: dict[str, Any] = {"config": config, "progress": True, "min_test": args.min_test}
    if sizes:
        kwargs["sizes"] = sizes
    if args.targets:
        try:
            kwargs["targets"] = check_targets([float(t) for t in args.targets.split(",")])
        except ValueError:
            raise SystemExit(f"--targets: comma-separated agreements in (0, 1] expected, got {args.targets!r}") from None
    result = run_learning_curve(args.dataset, **kwargs)
    path = write_results(result, results_dir=Path(args.results_dir), out=Path(args.out) if args.out else None)
    print(format_table(result))
    print(f"\nresults: {path}")
    return 0


def register_bench(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``learning-curve`` to the ``bench`` subparsers; sets ``func``."""
    p = bench_subparsers.add_parser("learning-curve", help="agreement and coverage as a route's data grows")
    p.add_argument("--dataset", nargs="+", required=True, metavar="PATH.jsonl",
                   help="request stream(s) ({\"messages\", \"answer\"} per line); several files are concatenated in order")
    p.add_argument("--out", help="also write the results JSON here")
    p.add_argument("--sizes", help="comma-separated N values (default 250,500,1000,2000,5000,10000)")
    p.add_argument("--targets", help="comma-separated agreements to report coverage at (default 0.95,0.98,0.99)")
    p.add_argument("--min-test", type=int, default=500, help="fewest held-back pairs (default 500)")
    p.add_argument("--results-dir", default="bench/results", help="where results go (default bench/results)")
    p.add_argument("--config-json", help="distiller settings as a JSON object, e.g. '{\"finetune\": \"never\"}'")
    p.set_defaults(func=_cmd_learning_curve, artifacts=None)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m distiller.cli distill ...`` / ``python -m distiller.cli bench learning-curve ...``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m distiller.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    register_bench(bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
