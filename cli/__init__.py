"""The ``kdgate`` command line: one typer app (:mod:`cli.app`), the thin edge over every package.

It may import ``gateway``, ``router``, ``distiller``, ``store`` and ``bench``; none of them imports it.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``kdgate`` (see :func:`cli.app.main`)."""
    from cli.app import main as run

    return run(argv)
