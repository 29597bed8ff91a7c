"""``kdgate keys create|list|limit|revoke``: gateway keys and their limits, written through the store.

A running gateway sees a change within about a second (the store's change generations)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.common import Db, Json, load
from cli.output import cell, fail, print_json, print_table, safe_text, usd, when

__all__ = ["app"]

app = typer.Typer(help="gateway keys: create, list, limit, revoke", no_args_is_help=True)

KeyName = Annotated[str, typer.Argument(metavar="KEY", help="key id or name")]
RoutesScope = Annotated[str | None, typer.Option(
    "--routes", help="comma-separated route names or globs the key may use ('all' clears; default: every route)")]
LIMITS = ("rpm", "tpm", "budget_day_usd", "budget_month_usd", "routes")


def _ledger(ctx: typer.Context, db: str | None) -> Any:
    from store import Ledger

    return Ledger(load(ctx, db=db).db)


def _routes_arg(value: str | None) -> list[str] | None:
    """``--routes a,b`` as a list; ``--routes all`` (or empty) clears the scope."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    return None if not names or names == ["all"] else names


def _find(ledger: Any, name: str) -> dict[str, Any] | None:
    return next((k for k in ledger.keys() if name in (k["id"], k["name"])), None)


def _summary(row: dict[str, Any]) -> str:
    limits = " ".join(f"{k}={cell(row[k])}" for k in LIMITS)
    return f"{row['id']} ({safe_text(row['name'])}): {limits}"


@app.command("create")
def create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="a name for the key (its owner, its app)")],
           routes: RoutesScope = None, db: Db = None, json: Json = False) -> None:
    """Create a key; it is shown once."""
    from gateway.auth import create_key

    ledger = _ledger(ctx, db)
    key_id, key = create_key(ledger, name)
    scope = _routes_arg(routes)
    if scope is not None:
        ledger.set_key_limits(key_id, {"routes": scope})
    if json:
        print_json({"id": key_id, "name": name, "key": key, "routes": scope}, indent=None)
    else:
        print(f"created {key_id} ({safe_text(name)}). The key is shown only once:\n{key}")


@app.command("list")
def list_keys(ctx: typer.Context, db: Db = None, json: Json = False) -> None:
    """Every key with its dates and limits."""
    rows = _ledger(ctx, db).keys()
    if json:
        print_json(rows, indent=None)
        return
    shown = [{**r, "created": when(r["created"]), "revoked": when(r["revoked"]),
              "budget_day_usd": None if r["budget_day_usd"] is None else usd(r["budget_day_usd"]),
              "budget_month_usd": None if r["budget_month_usd"] is None else usd(r["budget_month_usd"])} for r in rows]
    print_table(shown, ["id", "name", "created", "revoked", *LIMITS])


@app.command("limit")
def limit(
    ctx: typer.Context,
    name: KeyName,
    rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute")] = None,
    budget_day: Annotated[float | None, typer.Option(help="USD per UTC day")] = None,
    budget_month: Annotated[float | None, typer.Option(help="USD per UTC month")] = None,
    routes: RoutesScope = None,
    db: Db = None,
    json: Json = False,
) -> None:
    """Set a key's limits (a negative value clears one); applies within seconds."""
    changes: dict[str, Any] = {}
    for column, value in (("rpm", rpm), ("tpm", tpm), ("budget_day_usd", budget_day), ("budget_month_usd", budget_month)):
        if value is not None:
            changes[column] = None if value < 0 else value
    if routes is not None:
        changes["routes"] = _routes_arg(routes)
    ledger = _ledger(ctx, db)
    if not ledger.set_key_limits(name, changes):
        fail(f"no key {name!r}")
    row = _find(ledger, name)
    print_json(row, indent=None) if json else print(_summary(row))


@app.command("revoke")
def revoke(ctx: typer.Context, name: KeyName, db: Db = None, json: Json = False) -> None:
    """Revoke a key; a running gateway refuses it within seconds."""
    ledger = _ledger(ctx, db)
    if not ledger.revoke_key(name):
        fail(f"no active key {name!r}")
    if json:
        print_json(_find(ledger, name), indent=None)
    else:
        print(f"revoked {safe_text(name)}")
