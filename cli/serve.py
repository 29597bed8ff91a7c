"""``kdgate serve``: run the gateway (and its embedded distiller) with uvicorn."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from cli.common import load
from cli.output import fail

__all__ = ["serve"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    ctx: typer.Context,
    teacher: Annotated[str | None, typer.Option(help="default teacher, a litellm model string (e.g. openai/gpt-4o-mini)")] = None,
    teacher_api_base: Annotated[str | None, typer.Option(help="base URL of an OpenAI-compatible teacher")] = None,
    db: Annotated[str | None, typer.Option(help="the ledger: a SQLite path or postgresql://... (or KDGATE_DB, KDGATE_DB_FILE)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="accept requests without a key (local use only)")] = False,
) -> None:
    """Run the gateway."""
    settings = load(ctx, db=db, host=host, port=port, teacher=teacher, teacher_api_base=teacher_api_base,
                    auth=False if no_auth else None)
    if not settings.auth and settings.host not in _LOOPBACK:
        fail("refusing --no-auth on a non-loopback address; it is for local use only", 2)
    import uvicorn

    from gateway.app import create_app
    from store import Ledger, StoreError

    try:  # the ledger answers and its schema is one this kdgate knows, before anything starts
        Ledger(settings.db).close()
    except StoreError as exc:
        fail(str(exc), 2)

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
