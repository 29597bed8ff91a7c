"""``kill -9`` of a gateway under load: what was answered is in the ledger, but for the last window."""

from __future__ import annotations

import pytest

from bench.robust import run_crash

pytestmark = pytest.mark.slow


def test_kill_9_under_load_loses_at_most_the_last_flush_window(tmp_path):
    res = run_crash(seconds=4, connections=20, out=tmp_path / "crash.json", results_dir=tmp_path)
    assert res["answered"] > 100, res
    assert res["integrity_ok"] and res["restarted_ok"], res
    # everything answered before the last flush window is in the ledger; the loss, if any, is measured
    assert res["lost_before_last_flush"] == 0, res
    assert res["in_ledger"] + res["lost_after_last_flush"] == res["answered"]
