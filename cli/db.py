"""``kdgate db migrate | copy | check``: the ledger's database itself.

- ``migrate`` applies the named migrations (the gateway and the distiller also do at startup; a
  deploy can run it first, once, with the other replicas waiting for it).
- ``copy --from sqlite:///old.db --to postgresql://...`` moves an embedded ledger to PostgreSQL:
  every table in key order, ids kept, then a row-count check table by table (exit 1 on a mismatch).
- ``check`` says whether the database answers, its migrations, its integrity and its row counts.

A DSN's password is never printed: every message shows it as ``***``.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from cli.common import Json, load
from cli.output import fail, print_json, print_table

__all__ = ["app"]

app = typer.Typer(help="the ledger's database: migrate, copy a ledger to PostgreSQL, check", no_args_is_help=True)

Url = Annotated[str | None, typer.Option("--db", help="the ledger: a SQLite path, sqlite:///path or postgresql://... "
                                                       "(default: the settings', KDGATE_DB or KDGATE_DB_FILE)")]

# parents before children: routes and keys, then what refers to them
TABLES = ("routes", "api_keys", "students", "route_events", "exchanges", "shadow_checks", "embeddings")


def _open(url: str) -> Any:
    from store import Ledger, StoreError

    try:
        return Ledger(url)
    except StoreError as exc:
        fail(str(exc), 2)


@app.command("migrate")
def migrate(ctx: typer.Context, db: Url = None, json_out: Json = False) -> None:
    """Apply the migrations this database has not seen yet."""
    from store import redact
    from store.migrate import applied_migrations

    settings = load(ctx, db=db)
    ledger = _open(settings.db)  # opening migrates
    done = applied_migrations(ledger.conn)
    if json_out:
        print_json({"db": redact(settings.db), "migrations": done})
    else:
        print(f"{ledger.describe()}: {len(done)} migrations applied, newest {done[-1] if done else '-'}")
    ledger.close()


@app.command("check")
def check(ctx: typer.Context, db: Url = None, json_out: Json = False) -> None:
    """Connectivity, migrations, integrity and row counts of the ledger."""
    from store import redact
    from store.migrate import applied_migrations

    from pathlib import Path

    from store.db import is_postgres, sqlite_path

    settings = load(ctx, db=db)
    if not is_postgres(settings.db) and not Path(sqlite_path(settings.db)).exists():
        fail(f"There is no ledger at {settings.db}.", 2)
    t0 = time.perf_counter()
    ledger = _open(settings.db)
    integrity = ledger.integrity_check()
    result = {"db": redact(settings.db), "backend": "postgresql" if ledger.postgres else "sqlite",
              "connect_ms": round((time.perf_counter() - t0) * 1000, 1), "migrations": applied_migrations(ledger.conn),
              "integrity": integrity, "ok": integrity == ["ok"], "rows": ledger.table_counts()}
    ledger.close()
    if json_out:
        print_json(result)
    else:
        print(f"{result['backend']} {result['db']}: {'ok' if result['ok'] else 'PROBLEMS: ' + '; '.join(integrity)}"
              f" ({result['connect_ms']} ms to connect, {len(result['migrations'])} migrations)")
        print_table([{"table": t, "rows": n} for t, n in result["rows"].items()], ["table", "rows"])
    if not result["ok"]:
        raise typer.Exit(1)


@app.command("copy")
def copy(
    source: Annotated[str, typer.Option("--from", help="the ledger to copy, e.g. sqlite:///kdgate.db")],
    target: Annotated[str, typer.Option("--to", help="where to, e.g. postgresql://user:pass@host:5432/kdgate (must be empty)")],
    json_out: Json = False,
) -> None:
    """Copy every table of one ledger into an empty one (ids kept), then check the row counts."""
    from store import redact
    from store.counters import SharedCounters

    src, dst = _open(source), _open(target)
    before = dst.table_counts()
    if any(before[t] for t in TABLES):
        fail(f"{redact(target)} is not empty ({', '.join(f'{t} {before[t]}' for t in TABLES if before[t])}); "
             "copy into a fresh database.", 2)
    copied: dict[str, int] = {}
    for table in TABLES:
        t0 = time.perf_counter()
        copied[table] = dst.insert_rows(table, src.table_rows(table), fast=True)
        if not json_out:
            print(f"  {table}: {copied[table]:,} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    rebuilt = SharedCounters(dst).rebuild_spend()
    dst.touch("routes", "keys", "students")  # replicas of the target reload what they hold
    want, have = src.table_counts(), dst.table_counts()
    mismatched = {t: {"from": want[t], "to": have[t]} for t in TABLES if want[t] != have[t]}
    result = {"from": redact(source), "to": redact(target), "rows": copied, "key_spend_rows": rebuilt,
              "ok": not mismatched, "mismatched": mismatched}
    src.close()
    dst.close()
    if json_out:
        print_json(result)
    else:
        print(f"copied {sum(copied.values()):,} rows from {result['from']} to {result['to']}: "
              + ("row counts match" if result["ok"] else f"ROW COUNTS DIFFER: {mismatched}"))
    if mismatched:
        raise typer.Exit(1)
