"""The promotion gate of structured LM students compares the candidate and the live version on the
same pairs: the live version is decoded on the candidate's validation split.

On the locally built tiny base (fully fine-tuned; the real bases are what the benches measure). The
route's traffic drifts: the first version sees only hotel requests, so its own validation split is
easy and its recorded coverage high; the next version is validated on the newer, mixed traffic,
where the first one gets every flight and car request wrong. Compared by recorded coverage (the gate
before this test), the better version stayed a candidate.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests import extraction
from tests.distiller.conftest import seed_exchanges

ROUTE = "travel"
TARGET = 0.9


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    from bench.tiny import build_tiny_model
    from distiller.lm.config import LMTrainConfig
    from distiller.lm.train import distill_lm_route
    from store import Ledger

    root = tmp_path_factory.mktemp("lm-gate")
    rows = extraction.pairs(520, seed=21)
    hotel = [r for r in rows if json.loads(r["answer"])["intent"] == "book_hotel"][:100]
    mixed = [r for r in rows if r not in hotel][:300]
    base = build_tiny_model(root / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=96, layers=2,
                            heads=4, intermediate_size=256)
    config = LMTrainConfig.from_dict({
        "base_model": str(base), "method": "full", "progress": False, "target_agreement": TARGET,
        "structured": {"epochs": 20, "learning_rate": 3e-3, "extra_learning_rate": 1e-2, "vllm_export": False},
    })
    ledger = Ledger(root / "ledger.db")
    seed_exchanges(ledger, ROUTE, hotel)
    first = distill_lm_route(root / "ledger.db", ROUTE, config, artifacts_dir=root / "artifacts")
    seed_exchanges(ledger, ROUTE, mixed)
    second = distill_lm_route(root / "ledger.db", ROUTE, config, artifacts_dir=root / "artifacts")
    yield {"ledger": ledger, "first": first, "second": second, "base": base, "config": config}
    ledger.close()


def test_the_live_version_is_decoded_on_the_candidates_validation_pairs(drifted):
    from distiller.gate import served_at_own_threshold
    from distiller.registry import get, live
    from router.agreement import answers_agree
    from router.student import StudentError, load_student

    first, second, ledger = drifted["first"], drifted["second"], drifted["ledger"]
    assert first["kind"] == second["kind"] == "lm_structured" and first["status"] == "live"
    # the candidate is better on the same pairs and goes live, though its recorded coverage (on the
    # harder split) need not exceed the first version's (on its easy one)
    assert second["status"] == "live" and live(ledger, ROUTE)["version"] == second["version"]
    assert get(ledger, ROUTE, first["version"])["status"] == "retired"
    gate = second["metrics"]["gate"]
    assert gate["candidate_wins"]
    # every validation pair of the candidate is newer than the live version's data
    assert gate["live_version"] == first["version"] and gate["live_scored"] and gate["unseen_only"]
    assert gate["pairs"] == second["val_pairs"]

    # the live share, measured again through the serving path (the loaded student, one request at a
    # time) at the live version's own threshold: what the gate recorded
    row = get(ledger, ROUTE, first["version"])
    student = load_student(row["artifact_path"], expected_checksum=row["checksum"])
    val = list(ledger.teacher_pairs(ROUTE))[-second["val_pairs"]:]
    conf, correct = [], []
    try:
        for p in val:
            try:
                out = student.predict(p.messages, {})
            except StudentError:
                conf.append(0.0), correct.append(0.0)
                continue
            conf.append(out.confidence)
            correct.append(1.0 if answers_agree("json", out.text, p.answer) else 0.0)
    finally:
        student.close()
    share, agreement, served, _ = served_at_own_threshold(conf, correct, row["curve"], weights=None, target=TARGET)
    assert gate["live"] == pytest.approx(share, abs=2 / len(val))
    # the first version never saw a flight or a car: on the newer traffic it is mostly wrong
    assert np.mean(correct) < 0.6
    assert second["metrics"]["exact_agreement"] > np.mean(correct)


def test_a_request_too_long_to_read_scores_as_an_escalation_and_stays_out_of_the_fit(drifted):
    """A validation (or compared) request longer than the student reads counts as a disagreement with
    confidence 0, as serving escalates it, and never fails the run (it used to raise StudentError)."""
    from distiller.lm.structured import confidences, evaluate_and_calibrate, score
    from distiller.registry import get
    from router.artifact import load_manifest
    from router.lm_structured import load_structured_model

    row = get(drifted["ledger"], ROUTE, drifted["second"]["version"])
    model = load_structured_model(row["artifact_path"], load_manifest(row["artifact_path"]))
    val = list(drifted["ledger"].teacher_pairs(ROUTE))[-30:]
    texts = [model.template.strip(p.messages) for p in val]
    answers = [p.answer for p in val]
    texts[3] = " ".join(["book a hotel in paris"] * 200)  # far over max_input_tokens
    scored = score(model, texts, answers, batch_size=8)
    assert scored.readable.tolist() == [i != 3 for i in range(30)]
    assert not scored.agree[3] and not scored.complete[3] and scored.answers[3] == ""
    assert len(scored.ms) == 29
    conf = confidences(model.calibrator, scored)
    assert conf[3] == 0.0 and (conf[scored.readable] > 0).all()
    _, curve, oof, metrics = evaluate_and_calibrate(scored, target=TARGET)
    assert metrics["unreadable"] == 1 and metrics["val_pairs"] == 30 and oof[3] == 0.0
    assert curve[-1]["coverage"] == pytest.approx(1.0)


def test_shadow_checks_join_validation_weighted_so_it_stands_for_the_traffic(drifted, tmp_path):
    """In cascade mode the teacher-answered pairs are the live version's escalations; the teacher's
    answers to shadow checks of served requests join the LM route's pairs, each standing for the
    requests it sampled (as for label students), so the curve and the gate describe the traffic."""
    from distiller.lm.train import distill_lm_route
    from store import Ledger
    from tests.sql import sql_rows

    rows = extraction.pairs(200, seed=33)
    ledger = Ledger(tmp_path / "l.db")
    seed_exchanges(ledger, ROUTE, rows[:150])
    served = [{**r, "served_by": "student", "answer": "{}"} for r in rows[150:190]]
    seed_exchanges(ledger, ROUTE, served)
    with ledger.conn:
        ledger.conn.execute("UPDATE exchanges SET student_version = 1 WHERE served_by = 'student'")
        uids = [r["uid"] for r in sql_rows(ledger, "SELECT uid FROM exchanges WHERE served_by = 'student' ORDER BY id DESC LIMIT 4")]
        for uid, r in zip(uids, rows[186:190][::-1]):
            ledger.conn.execute(
                "INSERT INTO shadow_checks (ts, route, exchange_uid, student_version, student_answer, teacher_answer, agree)"
                " VALUES (?, ?, ?, 1, '{}', ?, 0)", (1.8e9, ROUTE, uid, r["answer"]))
    # the last epoch's weights rather than the best epoch's: the best one can agree on all 31 pairs,
    # and a curve with no disagreement to weight says nothing about the weights
    config = dataclasses.replace(drifted["config"], structured={**drifted["config"].structured, "select_epoch": False})
    out = distill_lm_route(tmp_path / "l.db", ROUTE, config, artifacts_dir=tmp_path / "artifacts")
    assert out["val_pairs"] == 31 and out["train_pairs"] == 123  # 20% of the 150 pairs and 4 checks
    curve = sql_rows(ledger, "SELECT curve FROM students WHERE route = ?", (ROUTE,))[0]["curve"]
    points = json.loads(curve)
    # each check stands for 10 served requests (40 served, 4 checked): coverage counts their weight
    assert points[-1]["coverage"] == pytest.approx(1.0) and points[-1]["pairs"] == 31
    assert any(abs(p["coverage"] - p["pairs"] / 31) > 0.05 for p in points)
    ledger.close()


def test_replay_score_versions_scores_lm_versions_too(drifted):
    """``kdgate bench replay --score-versions`` scores structured LM versions on the stream's answers
    (it scored label students only, and reported nothing for an LM route)."""
    from bench.replay import score_versions

    rows = extraction.pairs(520, seed=21)
    hotel = [r for r in rows if json.loads(r["answer"])["intent"] == "book_hotel"][:100]
    later = [r for r in rows if r not in hotel][300:360]  # mixed traffic neither version trained on
    scores = {s["version"]: s for s in score_versions(drifted["ledger"], ROUTE, later, TARGET)}
    first, second = scores[drifted["first"]["version"]], scores[drifted["second"]["version"]]
    assert first["requests"] == second["requests"] == 60 and "error" not in first and "error" not in second
    assert first["status"] == "retired" and second["status"] == "live"
    assert second["agreement"] > first["agreement"] + 0.2  # the first never saw a flight or a car


def test_a_label_candidate_is_gated_against_a_live_lm_version_run_by_its_own_decoder(drifted):
    """The label distiller's gate runs the live version through :func:`distiller.gate.live_scores`, as
    the LM gate does: a structured LM live version is decoded in batches, and a request it declines
    (here: longer than it reads) counts as an escalation. The gate asked it one request at a time
    through ``predict`` and the StudentError failed the whole distillation run."""
    from distiller.config import DistillerConfig
    from distiller.gate import live_scores
    from distiller.pipeline import distill_route
    from distiller.registry import live

    ledger = drifted["ledger"]
    row = live(ledger, ROUTE)
    long = [{"messages": [{"role": "system", "content": extraction.SYSTEM},
                          {"role": "user", "content": " ".join([f"book a hotel in paris {i}"] * 120)}],
             "answer": json.dumps({"intent": "book_hotel", "city": "paris"})} for i in range(4)]
    seed_exchanges(ledger, ROUTE, long)
    newest = list(ledger.teacher_pairs(ROUTE))[-4:]
    conf, correct = live_scores(row, newest)
    assert list(conf) == [0.0] * 4 and list(correct) == [0.0] * 4  # escalations, not an error

    report = distill_route(ledger, ROUTE, DistillerConfig(finetune="never", min_pairs=50, val_split="newest"),
                           promote=False)  # the fixture's live version stays live for the other tests
    assert report.status == "trained", report.message
    gate = report.gate
    assert gate.live_version == row["version"] and gate.live_scored and gate.live is not None
    assert live(ledger, ROUTE)["version"] == row["version"]
