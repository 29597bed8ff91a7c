"""The replay benchmark's arithmetic, and one short replay through real processes."""

from __future__ import annotations

import json

import pytest

from gateway.replay import demo_stream, replay_metrics, run_replay


def _case():
    rows = [{"messages": [], "answer": a} for a in ["x", "y", "x", "y", "x", "y", "x", "y"]]
    # first two: no student yet; then the student answers with confidences, wrong on the low ones
    sent = [{"uid": str(i), "served_by": s, "answer": a} for i, (s, a) in enumerate(
        [("teacher", "x"), ("teacher", "y"), ("student", "x"), ("student", "y"), ("teacher", "x"), ("student", "y"), ("teacher", "x"), ("student", "y")])]
    ledger = {
        "0": {"cost_usd": 1.0, "counterfactual_usd": 1.0, "confidence": None, "student_answer": None},
        "1": {"cost_usd": 1.0, "counterfactual_usd": 1.0, "confidence": None, "student_answer": None},
        "2": {"cost_usd": 0.0, "counterfactual_usd": 1.0, "confidence": 0.99, "student_answer": "x"},
        "3": {"cost_usd": 0.0, "counterfactual_usd": 1.0, "confidence": 0.95, "student_answer": "y"},
        "4": {"cost_usd": 1.0, "counterfactual_usd": 1.0, "confidence": 0.40, "student_answer": "y"},  # escalated, student wrong
        "5": {"cost_usd": 0.0, "counterfactual_usd": 1.0, "confidence": 0.97, "student_answer": "y"},
        "6": {"cost_usd": 1.0, "counterfactual_usd": 1.0, "confidence": 0.50, "student_answer": "x"},  # escalated, student right
        "7": {"cost_usd": 0.0, "counterfactual_usd": 1.0, "confidence": 0.90, "student_answer": "y"},
    }
    return rows, sent, ledger


def test_replay_metrics_add_up():
    rows, sent, ledger = _case()
    m = replay_metrics(rows, sent, ledger)
    assert m["overall"]["student_share"] == 0.5
    assert m["overall"]["agreement"] == 1.0
    assert m["overall"]["saved_fraction"] == 0.5
    assert m["last_quarter"] == {**m["last_quarter"], "requests": 2, "student_share": 0.5}
    # the student alone (where it existed) is wrong once in six; with the two warm-up requests: 7/8
    assert m["student_alone_agreement"] == pytest.approx(7 / 8)
    # the oracle serves exactly the student's right answers: 5 of 8
    assert m["baselines"]["oracle"]["student_share"] == pytest.approx(5 / 8)
    assert 0.0 <= m["apgr"] <= 1.0 and set(m["cpt"]) == {"50", "80", "95"}
    # escalating only the lowest-confidence request recovers the whole gap: 3/8 of calls to the teacher
    assert m["cpt"]["95"] == pytest.approx(3 / 8)


def test_demo_stream_is_bundled():
    rows = demo_stream(limit=5)
    assert len(rows) == 5 and rows[0]["messages"][0]["role"] == "system" and "card_arrival" in rows[0]["messages"][0]["content"]


@pytest.mark.slow
def test_short_replay_through_real_processes(tmp_path):
    rows = demo_stream(limit=120)
    out = tmp_path / "replay.json"
    m, stack = run_replay(rows, name="pytest-short", out=out, rate=0, concurrency=2, workdir=tmp_path / "work", progress=False, results_dir=tmp_path / "results")
    assert stack is None
    saved = json.loads(out.read_text())
    for key in ("overall", "last_quarter"):
        assert set(saved[key]) >= {"student_share", "agreement", "saved_fraction"}
    assert set(saved["cpt"]) == {"50", "80", "95"} and "apgr" in saved
    assert saved["requests"] == 120 and saved["lost"] == 0
    assert saved["overall"]["agreement"] == 1.0  # no student this early: every answer is the teacher's
    assert (tmp_path / "results" / "replay-pytest-short.png").stat().st_size > 1000
