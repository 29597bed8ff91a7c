"""The replay benchmark's arithmetic, and one short replay through real processes."""

from __future__ import annotations

import json

import pytest

from bench.replay import demo_stream, replay_metrics, run_replay


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


def test_cascade_figures_and_ceiling_ratio():
    from bench.replay import cascade_figures, ceiling_ratio, format_table

    rows, sent, ledger = _case()
    m = replay_metrics(rows, sent, ledger, ceiling=0.8, target=0.98)
    # the student first answered request 3, after two teacher answers; every answer returned agreed
    assert (m["first_cascade_request"], m["teacher_pairs_before_cascade"], m["min_window_agreement"]) == (3, 2, 1.0)
    # the last quarter: the student served one of its two requests, rightly: 0.5 at the target, over 0.8
    assert m["ceiling_ratio"] == pytest.approx(0.5 / 0.8) and m["ceiling_share"] == 0.8
    assert replay_metrics(rows, sent, ledger)["ceiling_ratio"] is None  # no ceiling given
    served = [False] * 3 + [True] * 10
    correct = [True] * 3 + [True, False, True, False, True, True, True, True, True, True]
    f = cascade_figures(served, correct, window=4)
    assert f == {"first_cascade_request": 4, "teacher_pairs_before_cascade": 3, "min_window_agreement": 0.5}
    assert cascade_figures([False] * 5, [True] * 5)["first_cascade_request"] is None
    # served at 0.99, 0.9, 0.8 and 0.7, wrong at 0.8: at 98%, only the two most confident count
    assert ceiling_ratio([True] * 4 + [False], [True, True, False, True, True], [0.99, 0.9, 0.8, 0.7, 0.1], 0.5, 0.98) == \
        pytest.approx((2 / 5) / 0.5)
    table = format_table({**m, "pacing": "paced: 40 requests/s", "paced": {"held_s": 12.0, "holds": 3}, "dataset": "x",
                          "requests": 8, "lost": 0, "student_versions": []})
    assert "pacing: paced: 40 requests/s (held 12 s in 3 holds)" in table and "first student answer at request 3" in table


def test_replay_distiller_settings_are_checked_before_anything_starts(capsys):
    from bench.replay import distiller_overrides
    from cli.app import main

    assert distiller_overrides('{"min_val_checks": 150}') == {"min_val_checks": 150}
    assert distiller_overrides(None) == {}
    with pytest.raises(ValueError, match="Unknown distiller setting.*min_val_check"):
        distiller_overrides('{"min_val_check": 150}')
    with pytest.raises(ValueError, match="JSON object"):
        distiller_overrides("[1]")
    # the command refuses them before any process starts
    assert main(["bench", "replay", "--dataset", "nowhere.jsonl", "--config-json", '{"min_val_check": 150}']) == 2
    assert "min_val_check" in capsys.readouterr().err


def test_several_streams_interleave_as_routes_each_in_its_own_order():
    from bench.replay import mix_streams

    a = [{"messages": [{"role": "user", "content": f"a{i}"}], "answer": "x"} for i in range(300)]
    b = [{"messages": [{"role": "user", "content": f"b{i}"}], "answer": "y"} for i in range(100)]
    mixed = mix_streams([("task", a), ("other", b), ("task", a[:50])], seed=3)
    assert len(mixed) == 450 and {r["route"] for r in mixed} == {"task", "other", "task-2"}
    for route, rows in (("task", a), ("other", b), ("task-2", a[:50])):
        assert [r["messages"] for r in mixed if r["route"] == route] == [r["messages"] for r in rows]
    # drawn in proportion to what is left: every stream is spread over the whole mix, not run one after another
    positions = [i for i, r in enumerate(mixed) if r["route"] == "other"]
    assert positions[0] < 45 and positions[-1] > 405
    assert mix_streams([("task", a), ("other", b)], seed=3) == mix_streams([("task", a), ("other", b)], seed=3)
    assert "route" not in a[0]  # the inputs are not changed


def test_a_numeric_ceiling_is_refused_for_several_streams(tmp_path, capsys):
    from cli.app import main

    stream = tmp_path / "s.jsonl"
    stream.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "x"}) + "\n")
    assert main(["bench", "replay", "--dataset", str(stream), "--dataset", str(stream), "--ceiling", "0.9"]) == 2
    assert "with several --dataset" in capsys.readouterr().err


def test_demo_stream_is_bundled():
    rows = demo_stream(limit=5)
    assert len(rows) == 5 and rows[0]["messages"][0]["role"] == "system" and "card_arrival" in rows[0]["messages"][0]["content"]


@pytest.mark.slow
def test_short_replay_through_real_processes(tmp_path):
    rows = demo_stream(limit=120)
    out = tmp_path / "replay.json"
    m, stack = run_replay(rows, name="pytest-short", out=out, rate=0, concurrency=2, workdir=tmp_path / "work", progress=False,
                          results_dir=tmp_path / "results", distiller={"min_val_checks": 150})
    assert stack is None
    saved = json.loads(out.read_text())
    assert saved["distiller"]["min_val_checks"] == 150  # what the gateway's distiller ran with is recorded
    assert "min_val_checks = 150" in (tmp_path / "work" / "kdgate.toml").read_text()
    for key in ("overall", "last_quarter"):
        assert set(saved[key]) >= {"student_share", "agreement", "saved_fraction"}
    assert set(saved["cpt"]) == {"50", "80", "95"} and "apgr" in saved
    assert saved["requests"] == 120 and saved["lost"] == 0
    assert saved["overall"]["agreement"] == 1.0  # no student this early: every answer is the teacher's
    assert (tmp_path / "results" / "replay-pytest-short.png").stat().st_size > 1000


def test_score_versions_reads_each_version_against_the_streams_answers(tmp_path):
    """The replay's own ground truth: every registered version scored on answers it never trained on."""
    from distiller import registry
    from distiller.config import DistillerConfig
    from distiller.pipeline import distill_route
    from store import Ledger
    from bench.replay import score_versions
    from tests.distiller.conftest import load_fixture, seed_exchanges

    rows = load_fixture("banking77_small.jsonl")
    ledger = Ledger(tmp_path / "kdgate.db")
    seed_exchanges(ledger, "replay", rows[:200])
    report = distill_route(ledger, "replay", DistillerConfig(finetune="never", min_pairs=50),
                           artifacts_root=tmp_path / "artifacts")
    held_back = rows[200:]
    [score] = score_versions(ledger, "replay", held_back, 0.98)
    assert score["version"] == report.version and score["requests"] == len(held_back)
    assert score["trained_through"] == 200 and score["train_pairs"] == registry.get(ledger, "replay", report.version)["train_pairs"]
    assert 0.3 < score["agreement"] <= 1.0 and 0.0 <= score["coverage_at_target"] <= 1.0
    # a teacher that answers something the student never saw: nothing agrees, nothing can be served at 98%
    wrong = [{**r, "answer": "no such label"} for r in held_back]
    [bad] = score_versions(ledger, "replay", wrong, 0.98, limit=20)
    assert bad["agreement"] == 0.0 and bad["coverage_at_target"] == 0.0 and bad["requests"] == 20
    assert bad["agreement_when_served"] in (None, 0.0)


def test_score_versions_of_several_routes_reads_each_against_its_own_stream(tmp_path):
    """With several --dataset, every route's versions are scored on that route's last quarter only."""
    from distiller.config import DistillerConfig
    from distiller.pipeline import distill_route
    from store import Ledger
    from bench.replay import version_scores_by_route
    from tests.distiller.conftest import load_fixture, seed_exchanges

    rows = load_fixture("banking77_small.jsonl")
    ledger = Ledger(tmp_path / "kdgate.db")
    seed_exchanges(ledger, "task", rows[:200])
    # a second task whose teacher says one label, not banking77's: its own versions, its own answers
    other = [{**r, "answer": "refund" if i % 2 else "other"} for i, r in enumerate(rows)]
    seed_exchanges(ledger, "other", other[:200])
    cfg = DistillerConfig(finetune="never", min_pairs=50)
    task_v = distill_route(ledger, "task", cfg, artifacts_root=tmp_path / "artifacts").version
    other_v = distill_route(ledger, "other", cfg, artifacts_root=tmp_path / "artifacts").version
    scored = version_scores_by_route(ledger, {"task": rows, "other": other}, 0.98)
    assert set(scored) == {"task", "other"}
    [task], [oth] = scored["task"], scored["other"]
    assert task["version"] == task_v and oth["version"] == other_v
    assert task["requests"] == len(rows) - len(rows) * 3 // 4 == oth["requests"]
    assert task["agreement"] > 0.3  # banking77's student on banking77's answers
    # scored on the other route's answers, banking77's student would agree with none of them
    [crossed] = version_scores_by_route(ledger, {"task": other}, 0.98)["task"]
    assert crossed["agreement"] == 0.0


def test_the_decision_is_timed_on_the_runtime_the_gateway_serves_with(tmp_path, monkeypatch):
    """``router_decision_ms``: the live student's decision on both encoder runtimes, the headline
    figure on the one the gateway uses by default (ONNX Runtime where installed)."""
    import torch

    from bench.replay import time_decisions
    from distiller.config import DistillerConfig
    from distiller.pipeline import distill_route
    from router import embedding
    from store import Ledger
    from tests.distiller.conftest import load_fixture, seed_exchanges

    monkeypatch.setenv("KDGATE_MODEL_CACHE", str(tmp_path / "models"))
    rows = load_fixture("banking77_small.jsonl")
    ledger = Ledger(tmp_path / "kdgate.db")
    seed_exchanges(ledger, "replay", rows[:150])
    report = distill_route(ledger, "replay", DistillerConfig(finetune="never", min_pairs=50),
                           artifacts_root=tmp_path / "artifacts")
    from distiller import registry

    row = registry.get(ledger, "replay", report.version)
    monkeypatch.setattr(embedding, "_runtime", "torch")  # the bench switches it to ONNX while it times
    mkldnn, runtime = torch.backends.mkldnn.enabled, embedding._runtime
    try:
        timed = time_decisions(row["artifact_path"], row["checksum"], rows, n=30)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    assert timed["runtime"] == "onnx" and timed["requests"] == 30
    assert set(timed["by_runtime"]) == {"onnx", "torch"}
    assert timed["p50"] == timed["by_runtime"]["onnx"]["p50"] > 0
    assert all(t["p95"] >= t["p50"] for t in timed["by_runtime"].values())
    assert embedding._runtime == runtime  # the bench puts the process's runtime back


def test_toml_settings_are_what_the_gateway_reads(tmp_path):
    from bench.stack import toml_settings
    from gateway.settings import load_settings

    config = tmp_path / "kdgate.toml"
    config.write_text(toml_settings({"db": str(tmp_path / "x.db"), "auth": False, "ledger_flush_ms": 20.0, "admin_key": None,
                                     "distiller": {"poll_seconds": 1.0, "finetune": "never"},
                                     "routes": {"replay": {"aliases": ["gpt-4o"], "target_agreement": 0.97}}}))
    settings = load_settings(config)
    assert not settings.auth and settings.ledger_flush_ms == 20.0 and settings.admin_key is None
    assert settings.distiller == {"poll_seconds": 1.0, "finetune": "never"}
    assert settings.routes["replay"].aliases == ["gpt-4o"] and settings.routes["replay"].target_agreement == 0.97


@pytest.mark.slow
def test_sigterm_of_a_bench_stops_its_stand_in_gateway_and_distiller(tmp_path):
    """`kdgate demo` stopped with SIGTERM used to leave its gateway, stand-in and distiller running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = f"""
import json, sys, time, psutil
from pathlib import Path
from bench.stack import Stack
stack = Stack(Path({str(tmp_path / "work")!r})).start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # the embedded distiller is the gateway's child
    kids = psutil.Process(stack.gateway.pid).children(recursive=True)
    if kids:
        break
    time.sleep(0.2)
try:
    print(json.dumps([stack.teacher.pid, stack.gateway.pid, *[k.pid for k in kids]]), flush=True)
    time.sleep(600)
finally:
    print("stopped", flush=True)
"""
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(bench.stdout.readline())
        assert len(pids) >= 3, pids  # stand-in, gateway, distiller
        assert all(psutil.pid_exists(p) for p in pids)
        os.kill(bench.pid, signal.SIGTERM)
        assert bench.wait(90) == 128 + signal.SIGTERM
        assert bench.stdout.read().strip() == "stopped"
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if psutil.pid_exists(p)]
    finally:
        if bench.poll() is None:
            bench.kill()


@pytest.mark.slow
def test_sigterm_of_the_demo_mid_stream_stops_everything_it_started(tmp_path):
    """`kdgate demo` stopped with SIGTERM while it replays (the demo's own process, not a bench
    script): its gateway, stand-in teacher and distiller stop with it, and its first line says how
    the stream is paced."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = subprocess.Popen([sys.executable, "-m", "cli", "demo", "--limit", "2000", "--rate", "5", "--port", str(port),
                             "--dir", str(tmp_path / "demo"), "--no-wait"], stdout=subprocess.PIPE, text=True)
    try:
        first = demo.stdout.readline()
        assert "Pacing: paced" in first, first
        deadline = time.monotonic() + 120
        kids: list[psutil.Process] = []
        while time.monotonic() < deadline:  # stand-in, gateway and the gateway's distiller
            kids = psutil.Process(demo.pid).children(recursive=True)
            if len(kids) >= 3 and (tmp_path / "demo" / "kdgate.db").exists():
                break
            time.sleep(0.2)
        assert len(kids) >= 3, kids
        time.sleep(2)  # mid-stream: requests in flight
        os.kill(demo.pid, signal.SIGTERM)
        assert demo.wait(90) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k.pid for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    finally:
        if demo.poll() is None:
            demo.kill()


def test_the_demo_refuses_a_bad_stream_or_setting_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    missing = CliRunner().invoke(app, ["demo", "--dataset", str(tmp_path / "none.jsonl"), "--dir", str(tmp_path / "d"), "--no-wait"])
    assert missing.exit_code == 2 and "none.jsonl" in missing.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    refused = CliRunner().invoke(app, ["demo", "--dataset", str(bad), "--dir", str(tmp_path / "d"), "--no-wait"])
    assert refused.exit_code == 2 and "'messages' and 'answer'" in refused.output
    setting = CliRunner().invoke(app, ["demo", "--lm-base-model", "smollm2-135m", "--config-json", '{"no_such": 1}',
                                       "--dir", str(tmp_path / "d"), "--no-wait"])
    assert setting.exit_code == 2 and "no_such" in setting.output
    assert not (tmp_path / "d").exists()  # nothing started


@pytest.mark.slow
def test_the_demo_replays_an_extraction_stream_onto_an_lm_student(tmp_path):
    """`kdgate demo --dataset STREAM --lm-base-model BASE`: the issue's demo path. The stream waits
    while the distiller trains the route's LM student (the tiny random-init base, the real ones take
    minutes), which then answers through the gateway."""
    import sqlite3
    import subprocess
    import sys

    from bench.tiny import build_tiny_model
    from tests import extraction

    rows = extraction.pairs(420, seed=5)
    stream = tmp_path / "travel.jsonl"
    stream.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = build_tiny_model(tmp_path / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=96, layers=2, heads=4,
                            intermediate_size=256)
    settings = {"lm_preset": "tiny-cpu", "min_pairs": 250, "retrain_after_pairs": 100000,
                "lm_settings": {"structured": {"epochs": 40, "learning_rate": 3e-3, "extra_learning_rate": 1e-2,
                                               "batch_size": 16}}}
    demo = subprocess.run([sys.executable, "-m", "cli", "demo", "--dataset", str(stream), "--lm-base-model", str(base),
                           "--config-json", json.dumps(settings), "--target-agreement", "0.9", "--rate", "20",
                           "--port", "0", "--dir", str(tmp_path / "demo"), "--no-wait", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "held while the distiller trains" in demo.stderr  # not only while heads retrain
    metrics = json.loads(demo.stdout)
    assert metrics["requests"] == 420 and metrics["lost"] == 0
    assert metrics["paced"]["holds"] >= 1, metrics["paced"]
    with sqlite3.connect(tmp_path / "demo" / "kdgate.db") as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM students")]
        served = db.execute("SELECT COUNT(*) FROM exchanges WHERE served_by = 'student'").fetchone()[0]
    assert kinds and set(kinds) == {"lm_structured"}, kinds
    assert metrics["overall"]["student_share"] > 0 and served > 0
    assert json.loads((tmp_path / "demo" / "replay-demo-travel.json").read_text())["requests"] == 420  # beside its ledger
