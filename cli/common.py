"""What the commands share: the ``--db`` and ``--json`` options and the gateway settings they load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["Db", "Json", "config_path", "load", "dataset_paths"]

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


def dataset_paths(first: list[Path], ctx: typer.Context) -> list[Path]:
    """The files of ``--dataset A B ...``: click options take one value each, so the paths after the
    first arrive as the command's extra arguments (an extra argument that looks like an option fails)."""
    from cli.output import fail

    bad = [str(a) for a in ctx.args if a.startswith("-")]
    if bad:
        fail(f"unknown option(s) {', '.join(bad)}", 2)
    return [*first, *(Path(a) for a in ctx.args)]
