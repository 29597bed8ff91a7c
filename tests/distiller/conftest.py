"""Fixtures for distiller tests: a fresh ledger file seeded with teacher exchanges."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load_fixture(name: str) -> list[dict[str, Any]]:
    """Rows ({"messages", "answer"}) of a JSONL fixture under tests/fixtures."""
    with open(FIXTURES / name, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seed_exchanges(
    ledger: Any,
    route: str,
    rows: Iterable[dict[str, Any]],
    *,
    start_ts: float = 1_700_000_000.0,
    teacher_model: str = "gpt-4o",
) -> int:
    """Insert rows as successful teacher exchanges of ``route`` (plain INSERTs); returns how many.

    A row may carry ``logprobs`` (OpenAI logprobs.content), ``finish_reason``, ``status`` and
    ``served_by`` to model other outcomes.
    """
    n = 0
    base = ledger.max_exchange_id()
    with ledger.conn:
        for i, r in enumerate(rows):
            ledger.conn.execute(
                "INSERT INTO exchanges (uid, ts, route, endpoint, model, teacher_model, request, answer,"
                " finish_reason, status, served_by, teacher_logprobs) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    uuid.uuid4().hex,
                    start_ts + base + i,
                    route,
                    "chat.completions",
                    route,
                    teacher_model,
                    json.dumps({"messages": r["messages"], "temperature": 0}),
                    r["answer"],
                    r.get("finish_reason", "stop"),
                    r.get("status", 200),
                    r.get("served_by", "teacher"),
                    json.dumps(r["logprobs"]) if r.get("logprobs") else None,
                ),
            )
            n += 1
    return n


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    from store import Ledger

    led = Ledger(tmp_path / "kdgate.db")
    yield led
    led.close()


@pytest.fixture
def fast_config() -> Any:
    """Frozen encoder only, small minimums: the distiller's logic without minutes of training."""
    from distiller.config import DistillerConfig

    return DistillerConfig(finetune="never", min_pairs=50)
