"""Structured LM students served through vLLM, against a STAND-IN vLLM server (tests/standins/vllm_standin.py:
a real HTTP server on 127.0.0.1 speaking vLLM's documented ``/v1/completions`` with ``allowed_token_ids``,
``logprobs`` in its ``--logprobs-mode`` and runtime LoRA loading; no GPU inference server runs here).

The student is trained for real on the project's tiny random-init Llama with LoRA (tied and untied
heads), exported by the distiller as a plain LoRA adapter (distiller/lm/vllm_export.py), and must give
through vLLM exactly the answers and confidences it gives in-process; then the live gateway serves an
extraction route through it to the official ``openai`` client, plain and streamed.
"""

from __future__ import annotations

import copy
import json

import openai
import pytest

from bench.standin import ReplayTeacher, ServerThread, messages_key
from tests import extraction
from tests.conftest import ADMIN_KEY
from tests.sql import sql_rows
from tests.standins.vllm_standin import create_vllm_standin

pytestmark = pytest.mark.slow

ROUTE = "travel"


def _train(root, *, tied: bool):
    from bench.tiny import build_tiny_model
    from distiller.lm.structured import StructuredConfig, train_structured_student
    from router.artifact import write_manifest
    from router.template import learn_template

    rows = extraction.pairs(200, seed=3)
    base = build_tiny_model(root / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=64, layers=2, heads=4,
                            intermediate_size=128, tied=tied)
    template = learn_template([r["messages"] for r in rows])
    texts = [template.strip(r["messages"]) for r in rows]
    answers = [r["answer"] for r in rows]
    cfg = StructuredConfig(base_model=str(base), method="lora", lora_r=8, lora_alpha=16, epochs=8, learning_rate=3e-3,
                           extra_learning_rate=1e-2, progress=False, threads=2, serve_weights="fp32")
    directory = root / "artifacts" / ROUTE / "v1"
    directory.mkdir(parents=True)
    run = train_structured_student(texts[:140], answers[:140], texts[140:170], answers[140:170], cfg, directory,
                                   route=ROUTE, version=1, template=template, target=0.9)
    checksum = write_manifest(directory, run.manifest)
    return {"base": str(base), "dir": directory, "checksum": checksum, "manifest": run.manifest, "run": run,
            "rows": rows, "texts": texts, "later": rows[170:]}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def student(request, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("vllm-structured"), tied=request.param)


@pytest.fixture
def standin(student):
    app, state = create_vllm_standin(student["base"], served_model_name="tiny-base", logprobs_mode="processed_logprobs")
    with ServerThread(app) as server:
        yield server, state


def test_the_export_is_the_student_as_a_plain_lora_adapter(student):
    from transformers import AutoTokenizer

    from distiller.lm.vllm_export import check_export
    from router.lm_grammar import Request, RouteSchema, encode_answer

    d, vllm = student["dir"], student["manifest"]["vllm"]
    cfg = json.loads((d / "vllm-adapter" / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"]) and {"q_proj", "down_proj"} <= set(cfg["target_modules"])
    assert cfg["r"] == cfg["lora_alpha"] == vllm["rank"] == 16  # 8 trained, 10 extra tokens: the next vLLM rank
    schema = RouteSchema.from_dict(json.loads((d / "schema.json").read_text()))
    assert len(vllm["token_ids"]) == schema.n_extra and len(set(vllm["token_ids"])) == schema.n_extra
    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    seen = {i for t in student["texts"][:170] for i in Request.make(tok, t).ids}
    assert not seen & set(vllm["token_ids"]) and not set(tok.all_special_ids) & set(vllm["token_ids"])
    assert "vllm-adapter/adapter_model.safetensors" in json.loads((d / "manifest.json").read_text())["files"]
    for text, answer in zip(student["texts"][140:145], [r["answer"] for r in student["rows"][140:145]]):
        req = Request.make(tok, text)
        ids, _ = encode_answer(schema, req, answer)
        prompt = [*schema.prefix_ids, *req.ids, schema.sep_id, *ids[:-1]]  # keys and labels in the input too
        assert check_export(d, student["base"], schema, vllm["token_ids"], prompt) < 1e-4


def test_through_vllm_the_answers_and_confidences_are_the_in_process_ones(student, standin):
    import asyncio

    from gateway.vllm_structured import VLLMStructuredStudent
    from router.lm_structured import StructuredLMStudent

    server, state = standin
    here = StructuredLMStudent(student["dir"], student["manifest"])
    there = VLLMStructuredStudent(student["dir"], student["manifest"], base_url=server.url + "/v1")
    try:
        assert "travel-v1" in state.adapters and state.adapters["travel-v1"]["path"].endswith("vllm-adapter")
        differ, calls = 0, 0
        for r in student["later"][:12]:
            a, b = here.predict(r["messages"]), there.predict(r["messages"])
            assert json.loads(b.text) is not None and b.extra["backend"] == "vllm"
            differ += a.text != b.text
            assert abs(a.confidence - b.confidence) < 1e-3, (a.confidence, b.confidence)
            assert b.extra["decisions"] == a.extra["decisions"] and b.completion_tokens == a.completion_tokens
            assert b.extra["views_agree"] == a.extra["views_agree"] is not None  # both orders, both backends
            calls += b.extra["calls"]  # one call per decision, in each of the two orders
        assert differ == 0
        bodies = [b for b in state.requests if "allowed_token_ids" in b]
        assert len(bodies) == calls and all(b["model"] == "travel-v1" and len(b["allowed_token_ids"]) >= 2 for b in bodies)
        assert all(b["max_tokens"] == 1 and all(isinstance(i, int) for i in b["prompt"]) for b in bodies)
        async def on_the_loop():  # the gateway's path: the async client, closed on the loop it ran on
            try:
                return await there.apredict(student["later"][0]["messages"])
            finally:
                await there.client.aclose()

        c = asyncio.run(on_the_loop())
        assert c.text == here.predict(student["later"][0]["messages"]).text
    finally:
        here.close()
        there.close()
    assert "travel-v1" not in state.adapters  # closing a retired version unloads its adapter


def test_raw_logprobs_are_refused_so_the_request_escalates(student):
    from gateway.vllm_structured import VLLMStructuredStudent
    from router.student import StudentError

    app, _ = create_vllm_standin(student["base"])  # vLLM's default --logprobs-mode raw_logprobs
    with ServerThread(app) as server:
        there = VLLMStructuredStudent(student["dir"], student["manifest"], base_url=server.url)
        try:
            with pytest.raises(StudentError, match="processed_logprobs"):
                for r in student["later"][:5]:  # the raw top-2 of the whole vocabulary leaves the allowed ids
                    there.predict(r["messages"])
        finally:
            there.close()


def test_requests_holding_a_repurposed_id_and_artifacts_without_export_are_refused(student, standin):
    from gateway.vllm_structured import VLLMStructuredStudent
    from router.student import StudentError

    server, _ = standin
    there = VLLMStructuredStudent(student["dir"], student["manifest"], base_url=server.url)
    try:
        tok = there.tokenizer
        word = next(tok.decode([t]) for t in there.from_served if tok(" " + tok.decode([t]).strip(),
                                                                       add_special_tokens=False)["input_ids"] == [t])
        messages = copy.deepcopy(student["later"][0]["messages"])
        messages[-1]["content"] += " " + word.strip()
        with pytest.raises(StudentError, match="repurposes"):
            there.predict(messages)
    finally:
        there.close()
    bare = {k: v for k, v in student["manifest"].items() if k != "vllm"}
    with pytest.raises(StudentError, match="no vLLM export"):
        VLLMStructuredStudent(student["dir"], bare, base_url=server.url)


def test_the_gateway_serves_an_extraction_route_through_vllm(student, standin, tmp_path):
    """``student_backend = "vllm"``: the live structured student answers through the stand-in, plain and
    streamed, to the official client; what it answered is logged."""
    from distiller import registry
    from gateway.app import create_app
    from gateway.settings import load_settings
    from store import Ledger

    server, state = standin
    db = tmp_path / "ledger.db"
    ledger = Ledger(db)
    m = student["manifest"]["metrics"]
    registry.register(ledger, route=ROUTE, version=1, kind="lm_structured", artifact_path=str(student["dir"]),
                      checksum=student["checksum"], train_pairs=m["train_pairs"], val_pairs=30, metrics=m,
                      curve=student["run"].curve, calibration=student["manifest"]["calibration"])
    registry.promote(ledger, ROUTE, 1)
    ledger.close()
    rows = student["rows"]
    teacher = ServerThread(ReplayTeacher({messages_key(r["messages"]): r["answer"] for r in rows}, model="gpt-4o")).start()
    settings = load_settings(
        db=str(db), artifacts_dir=str(tmp_path / "artifacts"), teacher="openai/gpt-4o", teacher_api_base=teacher.url + "/v1",
        auth=False, admin_key=ADMIN_KEY, student_backend="vllm", vllm_base_url=server.url + "/v1",
        routes={ROUTE: {"aliases": ["travel-model"], "mode": "cascade", "threshold": 0.0, "shadow_rate": 0.0}})
    gateway = ServerThread(create_app(settings)).start()
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
        kd = gateway.config.app.state.kdgate
        for r in student["later"][:3]:
            raw = client.chat.completions.with_raw_response.create(model="travel-model", messages=r["messages"])
            assert raw.headers["x-kdgate-served-by"] == "student", dict(raw.headers)
            assert isinstance(json.loads(raw.parse().choices[0].message.content), dict)
        with client.chat.completions.with_streaming_response.create(
                model="travel-model", messages=student["later"][3]["messages"], stream=True) as raw:
            assert raw.headers["x-kdgate-served-by"] == "student"
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert isinstance(json.loads(text), dict)
        assert any(b.get("model") == "travel-v1" and "allowed_token_ids" in b for b in state.requests)
        assert kd.writer.flush(10)
        served = sql_rows(kd.ledger, "SELECT * FROM exchanges WHERE route = ? AND served_by = 'student'", (ROUTE,))
        assert len(served) == 4 and all(json.loads(r["answer"]) is not None for r in served)
    finally:
        gateway.stop()
        teacher.stop()
