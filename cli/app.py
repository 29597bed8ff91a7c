"""The ``kdgate`` command: one typer app, the thin edge over gateway, router, distiller, store and bench.

    kdgate [--config FILE] serve
    kdgate keys create|list|limit|revoke          kdgate routes list|show|set|create|rename
    kdgate stats                                  kdgate distill / distill-lm
    kdgate demo                                   kdgate bench overhead|replay|learning-curve|lm-student|
    kdgate db migrate|copy|check                               lm-curve|lm-serving|gpu-check|soak|crash|dashboard

One module per resource (:mod:`cli.serve`, :mod:`cli.keys`, :mod:`cli.routes`, :mod:`cli.stats`,
:mod:`cli.distill`, :mod:`cli.bench`); each command imports what it drives when it runs, so
``kdgate --help`` loads typer and nothing of kdgate's. :func:`main` is the console script and what
tests call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from cli import bench, bench_lm, db, distill, keys, routes, serve, stats  # noqa: F401 (bench_lm adds bench lm-curve)

__all__ = ["app", "main"]


def _exit_status(status: Any, **_: Any) -> None:
    # a command that returns a non-zero int ends the process with it (the value comes up through the groups)
    if isinstance(status, int) and status:
        raise typer.Exit(status)


app = typer.Typer(
    name="kdgate",
    help="OpenAI-compatible gateway that distils your teacher model into students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    result_callback=_exit_status,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    config: Annotated[str | None, typer.Option("--config", help="TOML settings file (or KDGATE_CONFIG)")] = None,
) -> None:
    """OpenAI-compatible gateway that distils your teacher model into students."""


app.command("serve")(serve.serve)
app.add_typer(keys.app, name="keys")
app.add_typer(routes.app, name="routes")
app.command("stats")(stats.stats)
app.command("distill")(distill.distill)
app.command("distill-lm")(distill.distill_lm)
app.command("demo")(bench.demo)
app.add_typer(bench.app, name="bench")
app.add_typer(db.app, name="db")

# what the libraries need to run offline here; the environment wins when it says otherwise
_OFFLINE = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kdgate`` with ``argv`` (default: the process's arguments); returns the exit status.

    Never raises SystemExit: usage errors are 2, a settings error prints ``kdgate: <message>`` and
    is 2, Ctrl-C is 130, SIGTERM during a bench 143."""
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)
    command = typer.main.get_command(app)
    try:
        command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="kdgate", standalone_mode=True)
    except SystemExit as exc:
        return _code(exc.code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _known_error(exc)
        if message is None:
            raise
        from cli.output import error

        error(message)
        return 2
    return 0


def _code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message"), as sys.exit does
    return 1


def _known_error(exc: Exception) -> str | None:
    """The message of an error the user can fix (settings, an unusable store); None for a bug."""
    from gateway.settings import SettingsError
    from store import StoreError

    if isinstance(exc, (SettingsError, StoreError)):
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
