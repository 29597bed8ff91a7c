"""Shared fixtures: a stand-in teacher and a real gateway, both uvicorn servers on 127.0.0.1."""

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
def make_gateway(tmp_path: Path, teacher):
    """Start a gateway against the stand-in teacher; keyword arguments override settings."""
    from gateway.app import create_app
    from gateway.settings import load_settings

    started: list[ServerThread] = []

    def make(**overrides: Any) -> Gateway:
        _, tserver = teacher
        values = {
            "db": str(tmp_path / "ledger.db"),
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
