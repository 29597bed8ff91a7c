"""What importing the product costs: the gateway's app module pulls in no benchmark, stand-in,
plotting or OpenAI-SDK module (issue 14: the hot path imported the stand-in, and openai and
matplotlib were runtime dependencies because of the benches)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("bench", "cli", "matplotlib", "openai", "anthropic", "tests")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_gateway_app_imports_no_bench_standin_plotting_or_openai():
    loaded = _modules_after("import gateway.app")
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"import gateway.app loaded {bad[:20]}"


def test_building_the_app_still_imports_none_of_them(tmp_path):
    db = tmp_path / "ledger.db"
    loaded = _modules_after(
        "from gateway.app import create_app; from gateway.settings import load_settings; "
        f"create_app(load_settings(db={str(db)!r}, embedded_distiller=False, auth=False))")
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"create_app loaded {bad[:20]}"


def test_the_distiller_worker_and_the_store_import_no_gateway():
    loaded = _modules_after("import distiller.worker, store")
    assert not any(m.split(".")[0] == "gateway" for m in loaded)
