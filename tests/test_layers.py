"""The package boundaries of DESIGN.md, checked on the source: router imports neither gateway nor
distiller; the gateway never imports the distiller (they meet in the ledger and in artifacts); the
distiller reads the ledger through gateway.ledger only. The CLI is the edge allowed to import all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The command line may import all three; so may a `kdgate bench` command that drives the whole
# stack (the LM-student bench starts a gateway to time the student through it).
EDGES = {"gateway/cli.py", "distiller/lm/bench.py"}
ALLOWED = {
    "router": {"router"},
    "gateway": {"gateway", "router"},
    "distiller": {"distiller", "router", "gateway.ledger"},
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
