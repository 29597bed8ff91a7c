"""What the commands share: the ``--db`` and ``--json`` options and the gateway settings they load."""

from __future__ import annotations

from typing import Annotated, Any

import typer

__all__ = ["Db", "Json", "config_path", "load"]

Db = Annotated[str | None, typer.Option("--db", help="the ledger: a SQLite path or postgresql://... (default kdgate.db, KDGATE_DB)")]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output: one JSON document on stdout")]


def config_path(ctx: typer.Context) -> str | None:
    """The ``kdgate --config FILE`` given before the command (None: KDGATE_CONFIG or none)."""
    return ctx.find_root().params.get("config")


def load(ctx: typer.Context, **values: Any) -> Any:
    """The gateway settings: the config file, the environment, then ``values`` (None = not given).

    Raises ``gateway.settings.SettingsError``, which :func:`cli.app.main` shows as ``kdgate: ...``
    with exit status 2."""
    from gateway.settings import load_settings

    return load_settings(config_path(ctx), **values)
