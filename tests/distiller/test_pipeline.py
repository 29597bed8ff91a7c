"""End to end: ledger -> student -> artifact -> registry -> gate, with the real (offline) embedder."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from distiller import registry
from distiller.config import DistillerConfig
from distiller.pipeline import GateResult, distill_route
from router.artifact import ArtifactError
from router.student import load_student
from tests.distiller.conftest import load_fixture, seed_exchanges
from tests.sql import sql_rows, sql_value

METRIC_KEYS = {"agreement", "coverage_at_target", "target_agreement", "threshold_at_target", "ece"}


def _trained(ledger, route: str, rows: list[dict], config: DistillerConfig):
    seed_exchanges(ledger, route, rows)
    report = distill_route(ledger, route, config)
    assert report.status == "trained", report.message
    return report


def test_label_route_learned_served_in_teacher_format(ledger, fast_config, caplog) -> None:
    rows = load_fixture("banking77_small.jsonl")
    report = _trained(ledger, "triage", rows, fast_config)
    assert report.promoted and report.version == 1
    row = registry.live(ledger, "triage")
    assert row["kind"] == "label" and row["status"] == "live"
    assert METRIC_KEYS <= set(row["metrics"]) and row["metrics"]["agreement"] > 0.8
    assert row["train_pairs"] + row["val_pairs"] == len(rows)
    assert row["curve"] and set(row["curve"][0]) == {"threshold", "coverage", "agreement", "pairs"}
    assert row["calibration"]["method"] in ("isotonic", "platt")
    # <slug>-<digest of the exact route name>: routes whose names differ only in punctuation never share one
    assert Path(row["artifact_path"]).parent.name.startswith("triage-")

    student = load_student(row["artifact_path"], expected_checksum=row["checksum"])
    labels = {r["answer"] for r in rows}
    outs = [student.predict(r["messages"], {}) for r in rows[:20]]
    assert all(o.text in labels and 0.0 <= o.confidence <= 1.0 and o.version == 1 for o in outs)
    assert sum(o.text == r["answer"] for o, r in zip(outs, rows)) >= 17
    assert len(outs[0].embedding) == 384 * 4 and outs[0].embedding_model.startswith("all-MiniLM-L6-v2|t=")
    # the stored embedding of an exchange is the one the student computes for the same request
    stored = sql_rows(ledger, "SELECT vector FROM embeddings WHERE exchange_id = 1 AND model = ?",
                          (outs[0].embedding_model,))[0]["vector"]
    assert np.allclose(np.frombuffer(stored, "<f4"), np.frombuffer(outs[0].embedding, "<f4"), atol=1e-4)

    # retraining reuses the stored embeddings: nothing is embedded again
    n_vectors = sql_value(ledger, "SELECT count(*) FROM embeddings")
    assert n_vectors == len(rows)
    with caplog.at_level(logging.INFO, logger="distiller.pipeline"):
        again = distill_route(ledger, "triage", fast_config)
    assert again.version == 2
    assert not any("new exchanges" in r.getMessage() for r in caplog.records)
    assert sql_value(ledger, "SELECT count(*) FROM embeddings") == n_vectors


def test_structured_route_answers_in_the_teachers_exact_format(ledger, fast_config) -> None:
    rows = []
    for r in load_fixture("banking77_small.jsonl"):
        obj = {"urgent": r["answer"] in ("lost_or_stolen_card", "pin_blocked"), "intent": r["answer"]}
        rows.append({"messages": r["messages"], "answer": json.dumps(obj, separators=(",", ":"))})
    _trained(ledger, "tagger", rows, fast_config)
    row = registry.live(ledger, "tagger")
    assert row["kind"] == "structured"
    student = load_student(row["artifact_path"], expected_checksum=row["checksum"])
    outs = [student.predict(r["messages"], {}) for r in rows[:30]]
    for o in outs:
        obj = json.loads(o.text)
        assert list(obj) == ["urgent", "intent"]
        assert o.text == json.dumps(obj, separators=(",", ":"))  # byte for byte the teacher's spacing
    assert sum(o.text == r["answer"] for o, r in zip(outs, rows)) >= 25


def _logprobs(answer: str, p: float) -> list[dict]:
    other = "negative" if answer == "positive" else "positive"
    tops = [{"token": answer, "logprob": math.log(p), "bytes": None},
            {"token": other, "logprob": math.log(1 - p), "bytes": None}]
    return [{"token": answer, "logprob": math.log(p), "bytes": None, "top_logprobs": tops}]


def test_soft_labels_used_when_logprobs_are_present(ledger, fast_config) -> None:
    rows = load_fixture("sst2_small.jsonl")
    with_lp = [dict(r, logprobs=_logprobs(r["answer"], 0.8)) for r in rows]
    report = _trained(ledger, "sentiment", with_lp, fast_config)
    assert report.metrics["soft_label_rows"] == registry.live(ledger, "sentiment")["train_pairs"]
    hard = _trained(ledger, "sentiment-hard", rows, fast_config)
    assert hard.metrics["soft_label_rows"] == 0
    # soft targets (0.8/0.2) make a visibly less peaked head than hard ones on the same data
    soft_student = load_student(registry.live(ledger, "sentiment")["artifact_path"])
    hard_student = load_student(registry.live(ledger, "sentiment-hard")["artifact_path"])
    soft_raw = np.mean([o.extra["raw_score"] for o in soft_student.predict_batch([r["messages"] for r in rows[:50]])])
    hard_raw = np.mean([o.extra["raw_score"] for o in hard_student.predict_batch([r["messages"] for r in rows[:50]])])
    assert soft_raw < hard_raw


def test_corrupted_artifact_is_refused(ledger, fast_config) -> None:
    _trained(ledger, "triage", load_fixture("banking77_small.jsonl"), fast_config)
    row = registry.live(ledger, "triage")
    heads = Path(row["artifact_path"]) / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-1] ^= 0xFF
    heads.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        load_student(row["artifact_path"], expected_checksum=row["checksum"])
    with pytest.raises(registry.RegistryError, match="Refusing"):
        registry.promote(ledger, "triage", 1)
    (Path(row["artifact_path"]) / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="checksum"):
        load_student(row["artifact_path"], expected_checksum=row["checksum"])


def test_promotion_gate_keeps_the_better_version_and_rollback(ledger, fast_config, tmp_path) -> None:
    from cli.app import main as cli_main

    rows = load_fixture("banking77_small.jsonl")
    _trained(ledger, "triage", rows, fast_config)
    # a much weaker head (almost no weights) on the same validation pairs must not replace v1
    weak = distill_route(ledger, "triage", fast_config.with_overrides({"head_c": 1e-4}))
    assert weak.version == 2 and not weak.promoted
    assert weak.live_coverage is not None and not weak.gate.candidate_wins()
    assert registry.live(ledger, "triage")["version"] == 1
    assert registry.get(ledger, "triage", 2)["status"] == "candidate"
    assert "stays a candidate" in weak.message

    db = ledger.path
    assert cli_main(["distill", "--db", db, "--route", "triage", "--promote", "2"]) == 0
    assert registry.live(ledger, "triage")["version"] == 2
    assert cli_main(["distill", "--db", db, "--route", "triage", "--rollback", "1"]) == 0
    assert registry.live(ledger, "triage")["version"] == 1
    assert registry.get(ledger, "triage", 2)["status"] == "retired"
    assert cli_main(["distill", "--db", db, "--route", "triage", "--rollback", "9"]) == 1
    assert [e["kind"] for e in ledger.events("triage")][:2] == ["student.rollback", "student.promoted"]


def test_free_text_route_is_recorded_not_trained(ledger, fast_config) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Write a haiku about the number {i}"}],
             "answer": f"Number {i} drifts / over quiet water, {i * 7} / herons count the waves"} for i in range(80)]
    seed_exchanges(ledger, "poems", rows)
    report = distill_route(ledger, "poems", fast_config)
    assert report.status == "free_text" and "LM student" in report.message
    event = ledger.events("poems")[0]
    assert event["kind"] == "distill.detect" and event["detail"]["kind"] == "free_text"
    assert sql_value(ledger, "SELECT count(*) FROM students") == 0


def test_worker_picks_up_new_pairs(ledger, fast_config) -> None:
    from distiller.worker import Worker

    rows = load_fixture("banking77_small.jsonl")
    seed_exchanges(ledger, "triage", rows[:150])
    seed_exchanges(ledger, "tiny", rows[:3])
    worker = Worker(ledger.path, fast_config.with_overrides({"retrain_after_pairs": 50,
                                                             "retrain_after_minutes": 1e6}))
    first = {r.route: r.status for r in worker.step()}
    assert first == {"triage": "trained", "tiny": "insufficient"}
    assert worker.step() == []  # nothing new
    seed_exchanges(ledger, "triage", rows[150:180])
    assert worker.step() == []  # 30 new pairs: under retrain_after_pairs
    seed_exchanges(ledger, "triage", rows[180:])
    (report,) = worker.step()
    assert report.route == "triage" and report.version == 2
    assert registry.get(ledger, "triage", 2)["train_pairs"] + registry.get(ledger, "triage", 2)["val_pairs"] == len(rows)
    # a fresh worker (after a restart) resumes from the registry, not from zero
    assert Worker(ledger.path, worker.config).due("triage")[0] is False


def test_a_young_route_retrains_each_time_its_pairs_double(ledger, fast_config) -> None:
    """Until retrain_after_pairs is the smaller step, a route retrains when its pairs have doubled
    (60 -> 120 -> 240 here), so its first versions come within a few hundred pairs."""
    from distiller.worker import Worker

    rows = load_fixture("banking77_small.jsonl")
    worker = Worker(ledger.path, fast_config.with_overrides({"retrain_after_pairs": 500, "retrain_after_minutes": 1e6}))
    seed_exchanges(ledger, "triage", rows[:30])
    assert [r.status for r in worker.step()] == ["insufficient"]
    seed_exchanges(ledger, "triage", rows[30:60])  # 60 in all: enough for a first student, at once
    assert worker.due("triage")[0] and [r.status for r in worker.step()] == ["trained"]
    seed_exchanges(ledger, "triage", rows[60:110])
    due, why = worker.due("triage")
    assert not due, why  # 50 new pairs on 60: not doubled yet
    seed_exchanges(ledger, "triage", rows[110:125])
    due, why = worker.due("triage")
    assert due and "retrain after 60" in why


def _cheap_and_dear_routes(ledger, cheap: str, dear: str, n: int) -> list:
    """Two routes of ``n`` fresh teacher pairs each, ``dear``'s teacher ten times ``cheap``'s price;
    returns the fixture's rows (the first ``2 n`` are seeded)."""
    import time as _time

    rows = load_fixture("banking77_small.jsonl")
    now = _time.time()
    seed_exchanges(ledger, cheap, rows[:n], start_ts=now - 100)
    seed_exchanges(ledger, dear, rows[n:2 * n], start_ts=now - 100)
    with ledger.conn:
        ledger.conn.execute("UPDATE exchanges SET cost_usd = CASE route WHEN ? THEN 0.01 ELSE 0.001 END", (dear,))
    return rows


def test_the_worker_trains_first_the_route_expected_to_save_most(ledger, fast_config) -> None:
    """Two routes due at once: the one whose teacher costs more per second goes first."""
    from distiller.worker import Worker

    _cheap_and_dear_routes(ledger, "cheap", "dear", 80)
    worker = Worker(ledger.path, fast_config)
    assert worker.expected_saving_rate("dear") > 5 * worker.expected_saving_rate("cheap") > 0
    assert [r.route for r in worker.step()] == ["dear", "cheap"]


def test_schedule_in_turn_trains_the_route_that_waited_longest_first(ledger, fast_config) -> None:
    """``schedule = "in_turn"``: cost does not matter; a route that never trained, then the one
    whose last run is oldest, goes first."""
    from distiller.config import ConfigError
    from distiller.worker import Worker

    rows = _cheap_and_dear_routes(ledger, "alpha", "beta", 60)
    worker = Worker(ledger.path, fast_config.with_overrides({"schedule": "in_turn"}))
    assert worker.expected_saving_rate("beta") > worker.expected_saving_rate("alpha")  # by saving: beta first
    assert [r.route for r in worker.step()] == ["alpha", "beta"]  # neither trained: the ledger's (name) order
    seed_exchanges(ledger, "beta", rows[120:180])
    seed_exchanges(ledger, "alpha", rows[180:240])
    assert worker.due("alpha")[0] and worker.due("beta")[0]
    assert [r.route for r in worker.step()] == ["alpha", "beta"]  # alpha's run is the older one
    with pytest.raises(ConfigError, match="schedule must be saving or in_turn"):
        fast_config.with_overrides({"schedule": "round-robin"}).validate()


def test_learning_curve_bench_on_a_tiny_stream(tmp_path) -> None:
    from bench.learning_curve import format_table, run_learning_curve, write_results
    from tests.distiller.conftest import FIXTURES

    result = run_learning_curve([FIXTURES / "banking77_small.jsonl"], sizes=[60, 120, 10_000],
                                config=DistillerConfig(finetune="never"), min_test=60, targets=(0.99, 0.5, 0.988))
    assert result["skipped_sizes"] == [10_000] and result["test_pairs"] == 120
    assert [p["n"] for p in result["points"]] == [60, 120] and result["targets"] == [0.5, 0.988, 0.99]
    for p in result["points"]:
        cov = p["coverage"]
        assert list(cov) == ["0.5", "0.988", "0.99"] and p["train_seconds"] >= 0
        # a stricter agreement never covers more; at 50% a 120-pair student covers something
        assert cov["0.5"] >= cov["0.988"] >= cov["0.99"] and cov["0.5"] > 0
        assert 0.0 <= p["agreement"] <= 1.0
    assert "| cov@50 | cov@98.8 | cov@99 |" in format_table(result)
    with pytest.raises(ValueError):
        run_learning_curve([FIXTURES / "banking77_small.jsonl"], sizes=[60], targets=(98,))
    out = tmp_path / "lc.json"
    path = write_results(result, results_dir=tmp_path / "results", out=out)
    assert path.exists() and path.with_suffix(".md").exists()
    assert json.loads(out.read_text())["points"][1]["n"] == 120


@pytest.mark.slow
def test_encoder_fine_tuning_within_budget(ledger) -> None:
    config = DistillerConfig(finetune="always", finetune_budget_s=20, finetune_min_pairs=50, finetune_epochs=1,
                             finetune_max_tokens=64)
    report = _trained(ledger, "sentiment", load_fixture("sst2_small.jsonl"), config)
    history = report.metrics["history"]
    assert [h["encoder"] for h in history] == ["frozen", "finetuned"]
    assert history[1]["finetune_seconds"] <= 30 and history[1]["steps"] > 0
    row = registry.get(ledger, "sentiment", 1)
    if report.metrics["encoder"] == "finetuned":  # kept only when it covers more at the target
        assert (Path(row["artifact_path"]) / "encoder").is_dir()
        student = load_student(row["artifact_path"], expected_checksum=row["checksum"])
        out = student.predict(load_fixture("sst2_small.jsonl")[0]["messages"], {})
        # the stored-embedding key names the version that tuned the encoder and the template it strips
        assert out.text in ("positive", "negative") and out.embedding_model.startswith("kdgate:sentiment/v1|t=")


def test_worker_process_stops_cleanly_on_sigterm(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "kdgate.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distiller.worker", "--db", str(db), "--nice", "5",
         "--config-json", json.dumps({"poll_seconds": 0.2})],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not db.exists() and time.monotonic() < deadline:  # the worker opened the ledger
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    assert b"stopped" in out


@pytest.mark.slow
def test_worker_serves_the_head_first_then_fine_tunes_only_as_data_grows(ledger) -> None:
    """The frozen student is registered (and promoted) before the slow encoder fine-tuning starts, and
    fine-tuning is not repeated on every retrain: only once the data has grown by finetune_growth."""
    from distiller.worker import Worker

    rows = load_fixture("sst2_small.jsonl")
    seed_exchanges(ledger, "sentiment", rows[:120])
    config = DistillerConfig(finetune="auto", finetune_below_coverage=1.01, finetune_budget_s=8, finetune_min_pairs=50,
                             finetune_epochs=1, finetune_max_tokens=48, retrain_after_pairs=40, retrain_after_minutes=1e6)
    worker = Worker(ledger.path, config)
    worker.step()
    assert registry.get(ledger, "sentiment", 1)["metrics"]["encoder"] == "frozen"  # served before fine-tuning ends
    assert worker.finetuning("sentiment")  # the fine-tuning runs in the background
    worker.join_finetunes()
    versions = registry.list_students(ledger, "sentiment")
    encoders = sorted((v["version"], v["metrics"]["encoder"]) for v in versions)
    assert encoders[0] == (1, "frozen") and len(encoders) == 2  # head first, then the fine-tuning run
    assert "finetune" in registry.get(ledger, "sentiment", 2)["metrics"]
    runs = [e for e in ledger.events("sentiment") if e["kind"] == "distill.run"]
    assert len(runs) == 2 and all(r["detail"]["ok"] for r in runs)
    seed_exchanges(ledger, "sentiment", rows[120:170])  # 50 more: a retrain, but far from doubling
    worker.step()
    assert not worker.finetuning("sentiment")
    assert len(registry.list_students(ledger, "sentiment")) == 3
    v3 = registry.get(ledger, "sentiment", 3)["metrics"]
    assert "finetune" not in v3  # no new fine-tuning: heads on the frozen and on v2's tuned encoder
    variants = [h["encoder"] for h in v3["history"] if h["encoder"] != "certified"]
    assert variants == ["frozen", "finetuned (v2's, reused)"]
    _assert_certified_entry(v3["history"])


def _assert_certified_entry(history: list[dict]) -> None:
    """When a fine-tuned variant wins on plain scores, the frozen one is certified out of fold too and the
    larger certified share ships; the history says so in one "certified" entry, last."""
    certified = [h for h in history if h["encoder"] == "certified"]
    if not certified:
        return
    assert len(certified) == 1 and history[-1] is certified[0]
    shares = certified[0]["certified"]
    assert "frozen" in shares and len(shares) == 2
    assert certified[0]["coverage_at_target"] == max(shares.values())


def test_lexical_features_and_neighbour_votes_blend_and_survive_the_artifact(ledger, fast_config) -> None:
    rows = load_fixture("banking77_small.jsonl")
    report = _trained(ledger, "triage", rows, fast_config)
    row = registry.live(ledger, "triage")
    assert row["metrics"]["lexical_features"] > 50 and row["metrics"]["refit_pairs"] == len(rows)
    student = load_student(row["artifact_path"], expected_checksum=row["checksum"])
    model = student.model
    assert model.lexical is not None and model.lexical_weight == fast_config.lexical_weight
    # the refit model remembers every deduplicated pair, as float16
    assert model.neighbors is not None and model.neighbor_weight == fast_config.neighbor_weight
    assert model.neighbors.pairs == row["metrics"]["refit_pairs"] - row["metrics"]["dropped"].get("duplicate", 0)
    texts = [model.text_of(r["messages"]) for r in rows[:40]]
    X = student.embedder.encode(texts)
    blended = model.head_probs(X, texts)[0]
    alone = model.heads[0].probs(X)
    lexical = model.lexical_heads[0].probs(model.lexical.transform(texts))
    votes = model.neighbors.probs(X, [len(model.heads[0].classes)])[0]
    assert np.allclose(votes.sum(axis=1), 1.0)
    # a training request is its own nearest neighbour: the votes lean to the teacher's answer
    classes = model.heads[0].classes
    from distiller.detect import label_key

    assert np.mean([classes[i] == label_key(r["answer"]) for i, r in zip(votes.argmax(axis=1), rows)]) > 0.9
    wl, wn = model.lexical_weight, model.neighbor_weight
    expect = np.exp((1 - wl - wn) * np.log(alone + 1e-12) + wl * np.log(lexical + 1e-12) + wn * np.log(votes + 1e-12))
    assert np.allclose(blended, expect / expect.sum(axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(blended, alone, atol=1e-3)  # the other views do change the answer
    with pytest.raises(ValueError, match="texts"):
        model.decide(X)
    # without the blend, the artifact has no lexical or neighbour part and decide() needs no texts
    plain = distill_route(ledger, "triage", fast_config.with_overrides({"lexical_weight": 0.0, "neighbor_weight": 0.0}))
    assert plain.version == report.version + 1
    off = load_student(registry.get(ledger, "triage", plain.version)["artifact_path"])
    assert off.model.lexical is None and off.model.neighbors is None and off.model.decide(X)[0]
    assert np.allclose(off.model.head_probs(X)[0], off.model.heads[0].probs(X))


def test_shadow_checks_join_the_dataset_weighted_by_their_sampling_rate(ledger, fast_config) -> None:
    from distiller.dataset import load_route_dataset

    rows = load_fixture("banking77_small.jsonl")
    seed_exchanges(ledger, "triage", rows[:100])
    # 40 student-served requests of version 1, of which 4 were also asked of the teacher
    served = [{**r, "served_by": "student", "answer": "whatever the student said"} for r in rows[100:140]]
    seed_exchanges(ledger, "triage", served)
    with ledger.conn:
        ledger.conn.execute("UPDATE exchanges SET student_version = 1 WHERE served_by = 'student'")
        uids = [r["uid"] for r in sql_rows(ledger, "SELECT uid FROM exchanges WHERE served_by = 'student' ORDER BY id LIMIT 4")]
        for uid, r in zip(uids, rows[100:104]):
            ledger.conn.execute(
                "INSERT INTO shadow_checks (ts, route, exchange_uid, student_version, student_answer, teacher_answer, agree)"
                " VALUES (?, 'triage', ?, 1, 'whatever the student said', ?, 0)", (1.8e9, uid, r["answer"]))
    pairs = list(ledger.teacher_pairs("triage", shadow_checks=True))
    assert len(list(ledger.teacher_pairs("triage"))) == 100 and len(pairs) == 104
    checked = [p for p in pairs if p.served_by == "student"]
    assert [p.answer for p in checked] == [r["answer"] for r in rows[100:104]]  # the teacher's, not the student's
    assert all(p.weight == 10.0 for p in checked) and all(p.weight == 1.0 for p in pairs if p.served_by == "teacher")
    dataset = load_route_dataset(ledger, "triage", fast_config.with_overrides({"val_split": "newest"}))
    assert {e.weight for e in dataset.val} == {1.0, 10.0}  # the newest pairs validate, checks included


def test_head_retrain_reuses_the_live_fine_tuned_encoder(ledger) -> None:
    """Between fine-tunings a head retrain fits new heads on the live version's fine-tuned encoder
    (its embeddings stored once, under the version that fine-tuned it) instead of the frozen one."""
    rows = load_fixture("sst2_small.jsonl")
    seed_exchanges(ledger, "sentiment", rows[:120])
    # one epoch bounds the fine-tuning, not the clock: an 8 s budget cut it short under load (a full run
    # beside a replay: 8.5 s, and the tuned encoder then lost to the frozen one)
    tune = DistillerConfig(finetune="always", finetune_budget_s=120, finetune_min_pairs=50, finetune_epochs=1,
                           finetune_max_tokens=48)
    first = distill_route(ledger, "sentiment", tune)
    assert first.metrics["encoder"] == "finetuned", first.metrics["history"]
    if not first.promoted:
        registry.promote(ledger, "sentiment", first.version, reason="test: make the fine-tuned version live")
    seed_exchanges(ledger, "sentiment", rows[120:170])
    again = distill_route(ledger, "sentiment", tune.with_overrides({"finetune": "never"}))
    history = again.metrics["history"]
    assert [h["encoder"] for h in history if h["encoder"] != "certified"] == ["frozen", f"finetuned (v{first.version}'s, reused)"]
    _assert_certified_entry(history)
    stored = sql_value(ledger, "SELECT count(*) FROM embeddings WHERE model LIKE ?", (f"kdgate:sentiment/v{first.version}|t=%",))
    assert stored == 170  # every pair embedded once with the reused encoder
    if again.metrics["encoder"] == "finetuned":  # the reused encoder won: its weights are linked, not copied
        assert again.metrics["encoder_origin"] == first.version
        new = Path(registry.get(ledger, "sentiment", again.version)["artifact_path"]) / "encoder"
        old = Path(registry.get(ledger, "sentiment", first.version)["artifact_path"]) / "encoder"
        weights = next(p.name for p in old.rglob("*.safetensors"))
        assert (new / weights).stat().st_ino == (old / weights).stat().st_ino
    student = load_student(registry.get(ledger, "sentiment", again.version)["artifact_path"])
    assert student.predict(rows[0]["messages"], {}).text in {"positive", "negative"}


def test_gate_wants_a_larger_share_without_a_significant_loss_of_agreement() -> None:
    won = GateResult(candidate=0.8, live=0.6, pairs=500, unseen_only=True, target=0.98, candidate_agreement=0.99,
                     live_agreement=0.99, candidate_served_pairs=300)
    assert won.quality_ok() and won.candidate_wins()
    assert not dataclasses.replace(won, candidate=0.6).candidate_wins()  # the same share: the live one stays
    worse = dataclasses.replace(won, candidate_agreement=0.93)  # 93% on 300 pairs is significantly below 98%
    assert not worse.quality_ok() and not worse.candidate_wins()
    assert dataclasses.replace(won, candidate_agreement=0.95, candidate_served_pairs=20).quality_ok()  # 20 pairs say little
    # neither serves anything yet (young route): the plain curves decide, so shadow mode gets the better one
    assert dataclasses.replace(won, candidate=0.0, live=0.0, candidate_raw=0.5, live_raw=0.4).candidate_wins()
    assert not dataclasses.replace(won, candidate=0.0, live=0.0, candidate_raw=0.3, live_raw=0.4).candidate_wins()
    assert GateResult(candidate=0.0, live=None, pairs=50, unseen_only=False, candidate_raw=0.1).candidate_wins()
    # a live version serving these pairs significantly below the target (here 90% of 200) is not serving
    # what it should: its larger share counts for nothing, while one that holds up keeps it
    miscalibrated = dataclasses.replace(won, live=0.9, live_agreement=0.90, live_served_pairs=200)
    assert not miscalibrated.live_quality_ok() and miscalibrated.candidate_wins()
    assert not dataclasses.replace(miscalibrated, live_agreement=0.99).candidate_wins()
    # both versions cross-fitted on the holdout: their own curves' certified shares decide, not the few
    # hundred compared pairs (where a handful of heavy checks sway the shares)
    certified = dataclasses.replace(won, candidate=0.55, live=0.6, candidate_certified=0.72, live_certified=0.64)
    assert certified.candidate_wins()
    assert not dataclasses.replace(certified, candidate_certified=0.64).candidate_wins()
    assert not dataclasses.replace(certified, candidate_agreement=0.93).candidate_wins()  # quality still gates
    # neither certifies anything: the compared pairs decide as before
    assert dataclasses.replace(won, candidate_certified=0.0, live_certified=0.0).candidate_wins()


def test_gate_compares_on_pairs_the_live_version_never_trained_on(ledger, fast_config) -> None:
    """The live version was refit on its own newest pairs; scored on them it would look better than it
    is. With enough newer pairs, the gate uses only those, for both versions."""
    rows = load_fixture("banking77_small.jsonl")
    config = fast_config.with_overrides({"val_fraction": 0.5, "val_split": "newest"})
    seed_exchanges(ledger, "triage", rows[:120])
    first = distill_route(ledger, "triage", config)
    assert first.promoted and first.gate.live is None
    seed_exchanges(ledger, "triage", rows[120:240])  # 120 pairs v1 never saw
    second = distill_route(ledger, "triage", config)
    assert second.gate.unseen_only and second.gate.pairs == 120  # the newest 120 of 240 validate
    assert second.gate.live is not None and 0.0 <= second.gate.candidate <= 1.0
    assert second.to_dict()["gate"]["pairs"] == 120
    # too few unseen pairs: all validation pairs are used (and the report says so)
    registry.promote(ledger, "triage", second.version, reason="test: v2 live, it saw all 240 pairs")
    seed_exchanges(ledger, "triage", rows[:10])
    third = distill_route(ledger, "triage", config)
    assert not third.gate.unseen_only and third.gate.pairs > 100


def test_holdout_split_is_gated_on_every_held_out_prompt_no_version_trained_on(ledger, fast_config) -> None:
    """val_split "holdout": validation is the route's held-out prompts over its whole life. With the
    refit the shipped version learnt from its held-out prompts too, so the next gate keeps to the
    pairs newer than it (all pairs when too few, as before); without the refit no version ever
    trained on a held-out prompt, and the gate compares on every one of them."""
    from store.registry import get as registry_row

    rows = load_fixture("banking77_small.jsonl")
    refit = fast_config.with_overrides({"val_split": "holdout", "val_fraction": 0.5})
    seed_exchanges(ledger, "triage", rows[:220])
    first = distill_route(ledger, "triage", refit)
    assert first.promoted and first.metrics["val_split"] == "holdout" and first.metrics["holdout_fraction"] == 0.5
    assert first.metrics["refit_pairs"] == 220 and first.metrics["val_reach_back"] == 0
    # a frozen encoder saw no pair: every pair is scored by a fold model that did not learn from it
    assert first.metrics["scored_out_of_fold"] and first.metrics["certified_on_pairs"] == 220
    held_only = distill_route(ledger, "triage", refit.with_overrides({"cross_fit_folds": 0}), promote=False)
    assert held_only.metrics["certified_on_pairs"] == registry_row(ledger, "triage", held_only.version)["val_pairs"]
    v1 = registry_row(ledger, "triage", first.version)
    assert v1["train_pairs"] + v1["val_pairs"] == 220 and abs(v1["val_pairs"] - 110) < 30
    seed_exchanges(ledger, "triage", rows[220:])
    second = distill_route(ledger, "triage", refit)  # ~10 held-out pairs newer than v1: all are compared
    assert not second.gate.unseen_only and second.gate.pairs == registry_row(ledger, "triage", second.version)["val_pairs"]

    plain = refit.with_overrides({"refit_on_validation": False})
    third = distill_route(ledger, "triage", plain)
    assert "refit_pairs" not in third.metrics and "scored_out_of_fold" not in third.metrics
    registry.promote(ledger, "triage", third.version, reason="test: a version that never trained on a held-out prompt")
    fourth = distill_route(ledger, "triage", plain)
    val_pairs = registry_row(ledger, "triage", fourth.version)["val_pairs"]
    assert val_pairs >= 100 and fourth.gate.unseen_only and fourth.gate.pairs == val_pairs
    assert fourth.gate.live == pytest.approx(fourth.gate.candidate)  # same data, same model: the same share


def test_validation_reached_back_is_scored_out_of_fold(fast_config) -> None:
    """A validation split that reached back for shadow checks is scored by fold models that learnt
    from the rest of it: an intent the teacher only began to use inside that window is still
    learnt, as the shipped (refit) version learns it; a model fit on the older pairs alone never
    could."""
    from distiller.dataset import Example, build_dataset
    from distiller.train import train_candidate
    from router.embedding import get_embedder

    rows = load_fixture("banking77_small.jsonl")
    others = [r for r in rows if r["answer"] != "pin_blocked"]
    pins = [r for r in rows if r["answer"] == "pin_blocked"]
    recent = [x for pair in zip(others[160:], pins) for x in pair] + others[160 + len(pins):] + pins[len(others) - 160:]
    stream = others[:160] + recent  # the last 80 pairs, every third of them a shadow check
    examples = [Example(id=i, messages=r["messages"], answer=r["answer"], weight=50.0 if i >= 160 and i % 3 == 1 else 1.0)
                for i, r in enumerate(stream)]
    embedder = get_embedder(fast_config.embedder)
    cfg = fast_config.with_overrides({"min_val_checks": 27, "val_split": "newest"})

    def scored(config):
        ds = build_dataset("pins", [Example(**vars(e)) for e in examples], config)
        cand = train_candidate(ds, config, embed=embedder.encode)
        is_pin = np.array([e.answer == "pin_blocked" for e in ds.val])
        return ds, cand, np.asarray(cand.val_scores[1], dtype=float)[is_pin]

    ds, cand, pin_correct = scored(cfg)
    assert ds.val[0].id == 160 and ds.val_reach_back == 80 - 48 and ds.val_checks == 27 and not any(e.answer == "pin_blocked" for e in ds.train)
    assert cand.metrics["val_reach_back"] == 32 and cand.metrics["val_checks"] == 27
    assert len(pin_correct) == len(pins) and pin_correct.mean() > 0.6
    assert "pin_blocked" in cand.model.heads[0].classes  # the shipped model, refit on all pairs
    # the same split without the refit: the model that ships is the one fit on the older pairs, and its
    # own scores (which never get a pin right) are what describe it
    _, plain, plain_pins = scored(cfg.with_overrides({"refit_on_validation": False}))
    assert plain_pins.sum() == 0 and "pin_blocked" not in plain.model.heads[0].classes


def test_worker_gives_extraction_routes_the_lm_student_and_others_the_label_student(ledger, fast_config, tmp_path) -> None:
    """With ``lm_base_model`` set, an extraction route (values copied from the request) goes to the LM
    distiller first; when that fails (here: no such base model) the label student is trained instead.
    A JSON route without open values never tries the LM."""
    import json

    from distiller.worker import Worker
    from tests import extraction

    seed_exchanges(ledger, "travel", extraction.pairs(120, seed=2))
    seed_exchanges(ledger, "flags", [{"messages": [{"role": "user", "content": f"ticket {i}: my card was declined"}],
                                      "answer": json.dumps({"intent": "card", "urgent": i % 3 == 0})} for i in range(120)])
    worker = Worker(ledger.path, fast_config.with_overrides({"lm_base_model": str(tmp_path / "no-such-model")}))
    reports = {r.route: r for r in worker.step()}
    assert reports["travel"].status == "trained" and reports["flags"].status == "trained"
    chosen = {r: [e["detail"]["kind"] for e in ledger.events(r) if e["kind"] == "distill.student_kind"]
              for r in ("travel", "flags")}
    assert chosen == {"travel": ["lm"], "flags": ["label"]}
    failed = [e for e in ledger.events("travel") if e["kind"] == "distill.run" and e["detail"].get("kind") == "lm"]
    assert failed and failed[0]["detail"]["ok"] is False  # the LM run was tried, and failed
    assert registry.live(ledger, "travel")["kind"] == "structured"  # the label student serves meanwhile
    # every run, LM or label, is bracketed by distill.started / distill.finished (bench replay --paced
    # holds its stream on them): the failed LM run and the label run that followed it
    travel = [(e["kind"], (e["detail"] or {}).get("status")) for e in reversed(ledger.events("travel"))
              if e["kind"] in ("distill.started", "distill.finished")]
    assert travel == [("distill.started", None), ("distill.finished", "failed"),
                      ("distill.started", None), ("distill.finished", "trained")]
