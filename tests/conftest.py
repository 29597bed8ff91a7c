"""Shared fixtures: a stand-in teacher and a real gateway, both uvicorn servers on 127.0.0.1, and the
ledger's database: a SQLite file, or a fresh database on a real PostgreSQL server (tests/pg.py).

A test (or module) marked ``both_backends`` runs once per backend: its ``backend`` is "sqlite" and
then "postgresql", and ``make_gateway`` and ``db_url`` follow it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _k in [k for k in os.environ if k.startswith("KDGATE_")]:
    del os.environ[_k]

from bench.standin import ReplayTeacher, ServerThread  # noqa: E402

ADMIN_KEY = "test-admin-" + "a" * 32
BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "both_backends: run once on SQLite and once on PostgreSQL")


def pytest_generate_tests(metafunc: Any) -> None:
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def backend() -> str:
    """The ledger's backend: SQLite unless the test is marked ``both_backends``."""
    return "sqlite"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One real PostgreSQL server for the session (Debian's binaries; see tests/pg.py)."""
    from tests.pg import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries not found (apt-get install postgresql; make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: Any) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL server."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: Any) -> str:
    """The ledger for this test on its backend: a SQLite file, or a fresh PostgreSQL database."""
    if backend == "postgresql":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "ledger.db")


def echo_answer(body: dict[str, Any]) -> str:
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content") if isinstance(last, dict) else ""
    return f"echo: {content}" if isinstance(content, str) else "echo"


@pytest.fixture
def teacher() -> Iterator[tuple[ReplayTeacher, ServerThread]]:
    standin = ReplayTeacher(fallback=echo_answer, model="gpt-4o-mini", labels=["positive", "negative"])
    with ServerThread(standin) as server:
        yield standin, server


class Gateway:
    def __init__(self, server: ServerThread, settings: Any):
        self.server = server
        self.settings = settings

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    @property
    def state(self) -> Any:
        return self.server.config.app.state.kdgate

    def flush(self) -> None:
        assert self.state.writer.flush(10)


@pytest.fixture
def make_gateway(tmp_path: Path, teacher, db_url: str):
    """Start a gateway against the stand-in teacher; keyword arguments override settings."""
    from gateway.app import create_app
    from gateway.settings import load_settings

    started: list[ServerThread] = []

    def make(**overrides: Any) -> Gateway:
        _, tserver = teacher
        values = {
            "db": db_url,
            "artifacts_dir": str(tmp_path / "artifacts"),
            "teacher": "openai/gpt-4o-mini",
            "teacher_api_base": tserver.url + "/v1",
            "teacher_api_key": "sk-provider-secret-" + "x" * 20,
            "admin_key": ADMIN_KEY,
            "embedded_distiller": False,
            "retry_backoff_s": 0.01,
        }
        values.update(overrides)
        settings = load_settings(**values)
        server = ServerThread(create_app(settings)).start()
        started.append(server)
        return Gateway(server, settings)

    yield make
    for server in started:
        server.stop()
