"""``kdgate routes list|show|set|create|rename``: routes and their settings, written through the store.

A running gateway picks a change up within about a second (the store's change generations)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from cli.common import Db, Json, load
from cli.output import cell, fail, print_json, print_table, safe_text

__all__ = ["app", "SETTINGS"]

app = typer.Typer(help="routes: list, show, set, create, rename", no_args_is_help=True)

RouteName = Annotated[str, typer.Argument(metavar="ROUTE", help="the route's name")]
# what `routes set` may change, with how a value is read from KEY=VALUE
FLOATS = ("threshold", "target_agreement", "target_confidence", "shadow_rate")
BOOLS = ("auto_cascade", "allow_student_when_teacher_down", "pii_scrub", "train_on_allowed_keys_only")
SETTINGS = ("mode", *FLOATS, *BOOLS, "allowed_keys")


def _table(ctx: typer.Context, db: str | None) -> Any:
    from gateway.routing import RouteTable
    from store import Ledger

    settings = load(ctx, db=db)
    return RouteTable(settings, Ledger(settings.db), writer=None)


def _route(table: Any, name: str) -> Any:
    route = table.get(name)
    if route is None:
        fail(f"no route named {name!r}")
    return route


def _view(table: Any, name: str) -> dict[str, Any]:
    route = _route(table, name)
    ledger = table.ledger
    return {
        "name": route.name, "teacher": route.teacher.model, "origin": route.origin, "settings": route.settings,
        "exchanges": ledger.count_exchanges(route.name), "template": (ledger.route(route.name) or {}).get("template"),
        "students": [{k: s[k] for k in ("version", "kind", "status", "metrics")} for s in reversed(ledger.student_versions(route.name))],
    }


def _show(view: dict[str, Any], json: bool) -> None:
    if json:
        print_json(view)
        return
    for k in ("name", "teacher", "origin", "exchanges"):
        print(f"{k:>12}: {cell(view[k])}")
    for k, v in view["settings"].items():
        print(f"{safe_text(k):>12}: {cell(v)}")
    for s in view["students"]:
        m = s["metrics"]
        print(f"  v{s['version']} {s['kind']} {s['status']}: agreement {cell(m.get('agreement'))}, "
              f"coverage@target {cell(m.get('coverage_at_target'))}")


def _parse_value(key: str, value: str) -> Any:
    """One ``KEY=VALUE`` value: ``none`` clears; ``98%`` is 0.98; booleans as 1/true/yes/on."""
    if value in ("", "none", "null"):
        return None
    if key in FLOATS:
        try:
            return float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            fail(f"invalid setting: {key} must be a number (or a percentage), got {value!r}", 2)
    if key in BOOLS:
        return value.lower() in ("1", "true", "yes", "on")
    if key == "allowed_keys":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@app.command("list")
def list_routes(ctx: typer.Context, db: Db = None, json: Json = False) -> None:
    """Every route with its teacher, mode, threshold, target and exchanges."""
    table = _table(ctx, db)
    counts = table.ledger.exchange_counts()
    rows = [{"name": r.name, "teacher": r.teacher.model, "origin": r.origin, "mode": r.settings.get("mode"),
             "threshold": r.settings.get("threshold"), "target": r.settings.get("target_agreement"),
             "exchanges": counts.get(r.name, 0)} for r in table.all()]
    if json:
        print_json(rows, indent=None)
    else:
        print_table(rows, ["name", "teacher", "origin", "mode", "threshold", "target", "exchanges"])


@app.command("show")
def show(ctx: typer.Context, name: RouteName, db: Db = None, json: Json = False) -> None:
    """A route's settings, template and student versions."""
    table = _table(ctx, db)
    _show(_view(table, name), json)


@app.command("set", help="Change route settings, e.g. kdgate routes set R mode=cascade target_agreement=98%. "
                         f"Settings: {', '.join(SETTINGS)}; 'none' clears one.")
def set_settings(
    ctx: typer.Context,
    name: RouteName,
    values: Annotated[list[str], typer.Argument(metavar="KEY=VALUE", help="settings to change")],
    db: Db = None,
    json: Json = False,
) -> None:
    from pydantic import ValidationError

    from gateway.admin import RouteUpdate

    changes: dict[str, Any] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq:
            fail(f"expected KEY=VALUE, got {item!r}", 2)
        if key not in SETTINGS:
            fail(f"unknown route setting {key!r}; known: {', '.join(SETTINGS)}", 2)
        changes[key] = _parse_value(key, value)
    try:
        RouteUpdate(**{k: v for k, v in changes.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"invalid setting: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}", 2)
    table = _table(ctx, db)
    _route(table, name)
    table.update_settings(name, changes, actor=os.environ.get("USER", "cli"))
    _show(_view(table, name), json)


@app.command("create")
def create(ctx: typer.Context, name: RouteName,
           teacher: Annotated[str | None, typer.Option(help="its teacher, a litellm model string (default: the gateway's)")] = None,
           db: Db = None, json: Json = False) -> None:
    """Create a named route."""
    from gateway.settings import ROUTE_NAME_PATTERN, valid_route_name

    if not valid_route_name(name):
        fail(f"invalid route name {name!r}: route names must match {ROUTE_NAME_PATTERN}", 2)
    table = _table(ctx, db)
    table.create(name, teacher=teacher, actor="cli")
    if json:
        print_json(_view(table, name))
    else:
        print(f"created route {safe_text(name)}")


@app.command("rename")
def rename(ctx: typer.Context, name: RouteName,
           new_name: Annotated[str, typer.Argument(metavar="NEW_NAME", help="the route's new name")],
           db: Db = None, json: Json = False) -> None:
    """Rename a route; its exchanges, students and history follow it."""
    from gateway.settings import ROUTE_NAME_PATTERN, valid_route_name

    table = _table(ctx, db)
    _route(table, name)
    if not valid_route_name(new_name):
        fail(f"invalid route name {new_name!r}: route names must match {ROUTE_NAME_PATTERN}", 2)
    if table.get(new_name) is not None:
        fail(f"a route named {new_name!r} already exists", 2)
    table.ledger.rename_route(name, new_name)
    if json:
        table.reload()
        print_json(_view(table, new_name))
    else:
        print(f"renamed {safe_text(name)} -> {safe_text(new_name)}")
