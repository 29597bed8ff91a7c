"""How the CLI shows things: tables (rich), JSON documents, money, shares, times, and escaped text.

Every string that a client could have chosen (route and key names, models, templates) goes through
:func:`safe_text` before it reaches the terminal, so an escape sequence in one cannot drive the
operator's terminal; table cells are rich ``Text`` objects, so ``[bold]`` in a name is not markup.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any, NoReturn

import typer

__all__ = ["safe_text", "cell", "print_table", "print_json", "when", "usd", "pct", "ms", "error", "fail"]


def safe_text(text: str) -> str:
    """``text`` with control characters escaped: names and models come from clients, and a raw
    escape sequence in one would reach the operator's terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)


def cell(value: Any) -> str:
    """One value as a table cell: ``-`` for none, 4 significant digits for floats, lists comma-joined."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(x) for x in value)
    return safe_text(str(value))


def when(ts: Any) -> str | None:
    """A unix time as an ISO 8601 UTC timestamp (``2026-03-01 12:00:00Z``); None stays None."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def usd(value: float | None) -> str:
    """Dollars with as many digits as a small amount needs (:func:`gateway.money.format_usd`)."""
    from gateway.money import format_usd

    return "-" if value is None else f"${format_usd(value)}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """``rows`` as a table of ``columns`` on stdout: a header, a rule, one line per row."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(Text(cell(r.get(c))) for c in columns))
    console = Console(highlight=False)
    if console.is_terminal:
        console.print(table)
        return
    # a pipe or a file: one line per row, never wrapped, no padding after the last column
    plain = Console(highlight=False, width=100_000, no_color=True)
    with plain.capture() as captured:
        plain.print(table)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def print_json(value: Any, *, indent: int | None = 2) -> None:
    """``value`` as one JSON document on stdout."""
    print(json.dumps(value, indent=indent, default=str))


def error(message: str) -> None:
    """Print ``kdgate: message`` on stderr, control characters escaped line by line."""
    print("kdgate: " + "\n".join(safe_text(line) for line in message.split("\n")), file=sys.stderr)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``kdgate: message`` on stderr and end the command with exit status ``code``."""
    error(message)
    raise typer.Exit(code)
