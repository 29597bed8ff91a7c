"""The ``kdgate`` command: a thin edge over the gateway, router and distiller libraries."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

__all__ = ["main"]


def _settings(args: argparse.Namespace, **extra: Any):
    from gateway.settings import load_settings

    values = {
        "db": getattr(args, "db", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "teacher": getattr(args, "teacher", None),
        "teacher_api_base": getattr(args, "teacher_api_base", None),
    }
    if getattr(args, "no_auth", False):
        values["auth"] = False
    values.update(extra)
    return load_settings(getattr(args, "config", None), **values)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v)
    return safe_text(str(v))


def safe_text(text: str) -> str:
    """``text`` with control characters escaped: names and models come from clients, and a raw
    escape sequence in one would reach the operator's terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _when(ts: Any) -> str | None:
    import datetime

    if not isinstance(ts, (int, float)):
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


# -- serve ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _settings(args)
    if not settings.auth and settings.host not in ("127.0.0.1", "localhost", "::1"):
        print("refusing --no-auth on a non-loopback address; it is for local use only", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


# -- keys -----------------------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.auth import create_key
    from store import Ledger

    ledger = Ledger(_settings(args).db)
    if args.action == "create":
        key_id, key = create_key(ledger, args.name)
        scope = _routes_arg(getattr(args, "routes", None))
        if scope is not None:
            ledger.set_key_limits(key_id, {"routes": scope})
        if args.json:
            print(json.dumps({"id": key_id, "name": args.name, "key": key, "routes": scope}))
        else:
            print(f"created {key_id} ({safe_text(args.name)}). The key is shown only once:\n{key}")
    elif args.action == "list":
        rows = ledger.keys()
        if args.json:
            print(json.dumps(rows))
        else:
            shown = [{**r, "created": _when(r["created"]), "revoked": _when(r["revoked"])} for r in rows]
            _print_table(shown, ["id", "name", "created", "revoked", "rpm", "tpm", "budget_day_usd", "budget_month_usd", "routes"])
    elif args.action == "limit":
        limits: dict[str, Any] = {}
        for flag, col in (("rpm", "rpm"), ("tpm", "tpm"), ("budget_day", "budget_day_usd"), ("budget_month", "budget_month_usd")):
            value = getattr(args, flag)
            if value is not None:
                limits[col] = None if value < 0 else value
        if getattr(args, "routes", None) is not None:
            limits["routes"] = _routes_arg(args.routes)
        if not ledger.set_key_limits(args.name, limits):
            print(f"no key {safe_text(args.name)!r}", file=sys.stderr)
            return 1
        row = next(k for k in ledger.keys() if args.name in (k["id"], k["name"]))
        print(json.dumps(row) if args.json else f"{row['id']} ({safe_text(row['name'])}): rpm={row['rpm']} tpm={row['tpm']} "
              f"budget_day_usd={row['budget_day_usd']} budget_month_usd={row['budget_month_usd']} routes={_cell(row['routes'])}")
    elif args.action == "revoke":
        if not ledger.revoke_key(args.name):
            print(f"no active key {args.name!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.name}")
    return 0


def _routes_arg(value: str | None) -> list[str] | None:
    """``--routes a,b`` as a list; ``--routes all`` (or empty) clears the scope."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    return None if not names or names == ["all"] else names


# -- routes ---------------------------------------------------------------------------------
def cmd_routes(args: argparse.Namespace) -> int:
    from store import Ledger
    from gateway.routing import RouteTable

    settings = _settings(args)
    ledger = Ledger(settings.db)
    table = RouteTable(settings, ledger, writer=None)
    if args.action == "list":
        rows = []
        for r in table.all():
            rows.append({"name": r.name, "teacher": r.teacher.model, "origin": r.origin, "mode": r.settings.get("mode"),
                         "threshold": r.settings.get("threshold"), "target": r.settings.get("target_agreement"),
                         "exchanges": ledger.count_exchanges(r.name)})
        if args.json:
            print(json.dumps(rows))
        else:
            _print_table(rows, ["name", "teacher", "origin", "mode", "threshold", "target", "exchanges"])
        return 0
    if args.action == "create":
        table.create(args.name, teacher=args.teacher, actor="cli")
        print(f"created route {args.name}")
        return 0
    route = table.get(args.name)
    if route is None:
        print(f"no route named {args.name!r}", file=sys.stderr)
        return 1
    if args.action == "set":
        changes: dict[str, Any] = {}
        for item in args.values:
            key, _, value = item.partition("=")
            if key not in ("mode", "threshold", "target_agreement", "target_confidence", "shadow_rate", "auto_cascade",
                           "allow_student_when_teacher_down", "pii_scrub", "allowed_keys", "train_on_allowed_keys_only"):
                print(f"unknown route setting {safe_text(key)!r}", file=sys.stderr)
                return 2
            changes[key] = _parse_value(key, value)
        from gateway.admin import RouteUpdate
        from pydantic import ValidationError

        try:
            RouteUpdate(**{k: v for k, v in changes.items() if v is not None})
        except ValidationError as exc:
            print(f"invalid setting: {exc.errors()[0]['msg']}", file=sys.stderr)
            return 2
        table.update_settings(args.name, changes, actor=os.environ.get("USER", "cli"))
        route = table.get(args.name)
    if args.action == "rename":
        from gateway.settings import ROUTE_NAME_PATTERN, valid_route_name

        if not valid_route_name(args.rename):
            print(f"invalid route name {safe_text(args.rename)!r}: route names must match {ROUTE_NAME_PATTERN}", file=sys.stderr)
            return 2
        if table.get(args.rename) is not None:
            print(f"a route named {safe_text(args.rename)!r} already exists", file=sys.stderr)
            return 2
        ledger.rename_route(args.name, args.rename)
        print(f"renamed {safe_text(args.name)} -> {safe_text(args.rename)}")
        return 0
    view = {"name": route.name, "teacher": route.teacher.model, "origin": route.origin, "settings": route.settings,
            "exchanges": ledger.count_exchanges(route.name), "template": (ledger.route(route.name) or {}).get("template")}
    view["students"] = [{k: s[k] for k in ("version", "kind", "status", "metrics")}
                        for s in reversed(ledger.student_versions(route.name))]
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        for k in ("name", "teacher", "origin", "exchanges"):
            print(f"{k:>12}: {_cell(view[k])}")
        for k, v in route.settings.items():
            print(f"{k:>12}: {_cell(v)}")
        for s in view["students"]:
            m = s["metrics"]
            print(f"  v{s['version']} {s['kind']} {s['status']}: agreement {m.get('agreement')}, coverage@target {m.get('coverage_at_target')}")
    return 0


def _parse_value(key: str, value: str) -> Any:
    if value in ("", "none", "null"):
        return None
    if key in ("threshold", "target_agreement", "target_confidence", "shadow_rate"):
        return float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    if key in ("auto_cascade", "allow_student_when_teacher_down", "pii_scrub", "train_on_allowed_keys_only"):
        return value.lower() in ("1", "true", "yes", "on")
    if key == "allowed_keys":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdgate", description="OpenAI-compatible gateway that distils your teacher model into students.")
    parser.add_argument("--config", help="TOML settings file (or KDGATE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", help="SQLite ledger path (default kdgate.db)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--teacher", help="default teacher, a litellm model string (e.g. openai/gpt-4o-mini)")
    p.add_argument("--teacher-api-base", help="base URL of an OpenAI-compatible teacher")
    p.add_argument("--db", help="SQLite ledger path")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--no-auth", action="store_true", help="accept requests without a key (local use only)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="gateway keys: create, list, revoke")
    ks = p.add_subparsers(dest="action", required=True)
    kc = ks.add_parser("create")
    kc.add_argument("name")
    kc.add_argument("--routes", help="comma-separated route names or globs the key may use (default: every route)")
    common(kc)
    kl = ks.add_parser("list")
    common(kl)
    kli = ks.add_parser("limit", help="set a key's limits (a negative value clears one); applies within seconds")
    kli.add_argument("name", help="key id or name")
    kli.add_argument("--rpm", type=int, help="requests per minute")
    kli.add_argument("--tpm", type=int, help="tokens per minute")
    kli.add_argument("--budget-day", type=float, help="USD per UTC day")
    kli.add_argument("--budget-month", type=float, help="USD per UTC month")
    kli.add_argument("--routes", help="comma-separated route names or globs the key may use ('all' clears)")
    common(kli)
    kr = ks.add_parser("revoke")
    kr.add_argument("name", help="key id or name")
    common(kr)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("routes", help="routes: list, show, set, create, rename")
    rs = p.add_subparsers(dest="action", required=True)
    rl = rs.add_parser("list")
    common(rl)
    rsh = rs.add_parser("show")
    rsh.add_argument("name")
    common(rsh)
    rst = rs.add_parser("set", help="e.g. kdgate routes set R mode=cascade target_agreement=98%")
    rst.add_argument("name")
    rst.add_argument("values", nargs="+", metavar="KEY=VALUE")
    common(rst)
    rc = rs.add_parser("create")
    rc.add_argument("name")
    rc.add_argument("--teacher")
    common(rc)
    rr = rs.add_parser("rename")
    rr.add_argument("name")
    rr.add_argument("rename", metavar="NEW_NAME")
    common(rr)
    p.set_defaults(func=cmd_routes)

    bench = sub.add_parser("bench", help="benchmarks; results under bench/results/")
    bsub = bench.add_subparsers(dest="bench", required=True)
    from bench.overhead import register as register_overhead

    register_overhead(bsub)
    for module in ("bench.replay", "distiller.cli", "distiller.lm.cli", "gateway.stats_cli", "bench.robust", "bench.dashboard"):
        _register(module, sub, bsub)
    return parser


def _register(module: str, sub: Any, bsub: Any) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if exc.name and exc.name.startswith(module.split(".")[0]) and exc.name in module:
            return  # that part of kdgate is not installed in this build
        raise
    if hasattr(mod, "register"):
        mod.register(sub)
    if hasattr(mod, "register_bench"):
        mod.register_bench(bsub)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from gateway.settings import SettingsError

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"kdgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
