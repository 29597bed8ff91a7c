"""The package boundaries of DESIGN.md, checked on the source: router imports neither gateway nor
distiller; the gateway never imports the distiller (they meet in the ledger and in artifacts); the
distiller reads the ledger through store only. The CLI is the edge allowed to import all."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Files exempt from their package's rule (none: the command line is its own package, `cli`).
EDGES: set[str] = set()
ALLOWED = {
    "store": {"store"},
    "router": {"router"},
    "gateway": {"gateway", "router", "store"},
    "distiller": {"distiller", "router", "store"},
    "bench": {"bench", "gateway", "router", "distiller", "store"},
    "cli": {"cli", "bench", "gateway", "router", "distiller", "store"},  # the thin edge over all of them
}


def _our_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ALLOWED}


def _allowed(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_design(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in EDGES:
            continue
        bad += [f"{rel} imports {name}" for name in sorted(_our_imports(path)) if not _allowed(name, ALLOWED[package])]
    assert not bad, "\n".join(bad)


# SQL keywords as they start a statement (or a clause inside one); uppercase, as all of kdgate's SQL is written
_SQL = re.compile(
    r"\b(SELECT\s+[\w*(].*\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b|"
    r"CREATE\s+(UNIQUE\s+)?(TABLE|INDEX)\b|ALTER\s+TABLE\b|DROP\s+TABLE\b|PRAGMA\s+\w+|BEGIN\s+(IMMEDIATE|EXCLUSIVE)\b)",
    re.DOTALL,
)
PRODUCT = ("gateway", "router", "distiller", "bench", "cli")  # every package but the store itself


def _sql_strings(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.search(node.value):
            found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: {node.value.strip()[:70]!r}")
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if _SQL.search(text):
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: f{text.strip()[:70]!r}")
    return found


def test_no_sql_outside_the_store() -> None:
    """The store is the one layer that speaks SQL: a second backend is a new class there, not a hunt."""
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += _sql_strings(path)
    assert not found, "SQL outside store/:\n" + "\n".join(found)


def test_the_detector_sees_sql() -> None:
    assert _SQL.search("SELECT version FROM students WHERE route = ?")
    assert _SQL.search("INSERT OR IGNORE INTO routes (name) VALUES (?)")
    assert _SQL.search("UPDATE exchanges SET route = ? WHERE uid = ?")
    assert not _SQL.search("Select a version from the list")
    assert _sql_strings(ROOT / "store" / "ledger.py")
