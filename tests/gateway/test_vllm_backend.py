"""The vLLM backend against a STAND-IN vLLM server (tests/standins/vllm_standin.py, a real HTTP
server on 127.0.0.1 speaking vLLM's documented API): adapter loading, generation with logprobs,
and vLLM's failure answers."""

from __future__ import annotations

import dataclasses
import shutil

import httpx
import numpy as np
import pytest

from bench import synthetic
from distiller.lm.config import preset
from bench.standin import ServerThread
from router.lm_student import logprob_features
from tests.standins.vllm_standin import create_vllm_standin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny base model and a LoRA student artifact on it (a few steps: the protocol is under test)."""
    from transformers import AutoTokenizer

    from distiller.lm.data import build_examples
    from bench.tiny import build_tiny_model
    from distiller.lm.train import save_student_weights, train_lm
    from store import Pair
    from router.artifact import write_manifest
    from router.lm_student import Calibrator

    root = tmp_path_factory.mktemp("vllm")
    items = synthetic.examples(64)
    base = build_tiny_model(root / "base", [f"{e.messages[-1]['content']} {e.answer}" for e in items], hidden_size=32, layers=1, intermediate_size=64)
    tok = AutoTokenizer.from_pretrained(base)
    pairs = [Pair(i, float(i), "orders", e.messages, e.answer, "stop", None, "teacher") for i, e in enumerate(items)]
    examples, _ = build_examples(tok, pairs, max_seq_len=128, use_teacher_logprobs=False)
    cfg = dataclasses.replace(
        preset("tiny-cpu"), base_model=str(base), method="lora", lora_r=4, lora_alpha=8, max_steps=3, checkpoint_every=0, progress=False
    )
    result = train_lm(cfg, examples, root / "work")
    directory = root / "artifacts" / "orders" / "v1"
    directory.mkdir(parents=True)
    weights = save_student_weights(result, cfg, directory)
    # a calibrator over logprob features only: confidence grows with the mean token logprob
    cal = Calibrator(kind="logistic", mean=[0.0] * 6, scale=[1.0] * 6, coef=[2.0, 0.5, 0, 0, 0, 0], intercept=1.0)
    manifest = {"kind": "lm", "route": "orders", "version": 1, "base_model": str(base), "weights": weights,
                "calibration": cal.to_json(), "generation": {"max_tokens": 8}, "distillation": "sequence"}
    checksum = write_manifest(directory, manifest)
    return {"base": str(base), "dir": directory, "checksum": checksum, "calibrator": cal}


@pytest.fixture(params=["envelope", "legacy"])
def vllm(request, artifact):
    app, state = create_vllm_standin(artifact["base"], served_model_name="tiny-base", error_format=request.param)
    with ServerThread(app) as server:
        yield server, state


MESSAGES = synthetic.examples(1, seed=5)[0].messages


async def test_load_generate_unload(vllm, artifact):
    import gateway.vllm_backend as vb

    server, state = vllm
    adapter = str(artifact["dir"] / "adapter")
    async with vb.VLLMClient(server.url + "/v1") as client:
        assert await client.models() == ["tiny-base"]
        assert "added successfully" in await client.load_adapter("orders-v1", adapter)
        assert await client.models() == ["tiny-base", "orders-v1"]
        with pytest.raises(vb.AdapterAlreadyLoaded, match="already been loaded"):
            await client.load_adapter("orders-v1", adapter)
        out = await client.generate("orders-v1", MESSAGES, {"max_tokens": 6, "top_logprobs": 2}, calibrator=artifact["calibrator"], version=1)
        assert state.requests[-1]["model"] == "orders-v1" and state.requests[-1]["logprobs"] is True
        assert 1 <= out.completion_tokens <= 6 and len(out.logprobs) == out.completion_tokens
        assert all(len(e["top_logprobs"]) == 2 for e in out.logprobs)
        features = logprob_features([e["logprob"] for e in out.logprobs])
        expected = artifact["calibrator"].predict(np.array([features]))[0]
        assert out.confidence == pytest.approx(expected)
        assert out.extra["backend"] == "vllm" and out.version == 1
        assert "removed successfully" in await client.unload_adapter("orders-v1")
        with pytest.raises(vb.AdapterNotFound, match="cannot be found"):
            await client.unload_adapter("orders-v1")
        with pytest.raises(vb.ModelNotFound, match="does not exist"):
            await client.generate("orders-v1", MESSAGES, {})


async def test_failure_answers_map_to_clear_errors(vllm, tmp_path):
    import gateway.vllm_backend as vb

    server, _ = vllm
    async with vb.VLLMClient(server.url) as client:
        with pytest.raises(vb.AdapterNotFound, match="No adapter found"):
            await client.load_adapter("ghost", tmp_path / "nowhere")
        with pytest.raises(vb.VLLMBadRequest, match="must be provided") as err:
            await client.load_adapter("", tmp_path)
        assert err.value.status == 400 and err.value.type == "InvalidUserInput"
    async with vb.VLLMClient("http://127.0.0.1:9", timeout=2) as dead:
        with pytest.raises(vb.VLLMUnavailable):
            await dead.models()


async def test_runtime_lora_updating_disabled(artifact):
    import gateway.vllm_backend as vb

    app, _ = create_vllm_standin(artifact["base"], runtime_lora_updating=False)
    with ServerThread(app) as server:
        async with vb.VLLMClient(server.url) as client:
            with pytest.raises(vb.VLLMRuntimeLoRADisabled, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
                await client.load_adapter("orders-v1", artifact["dir"] / "adapter")


async def test_vllm_student_matches_the_embedded_student(vllm, artifact):
    import gateway.vllm_backend  # noqa: F401  (registers the backend)
    from router.student import load_student

    server, state = vllm
    embedded = load_student(artifact["dir"], expected_checksum=artifact["checksum"])
    remote = load_student(artifact["dir"], expected_checksum=artifact["checksum"], backend="vllm", vllm_base_url=server.url + "/v1")
    try:
        assert "orders-v1" in state.adapters  # loaded when the student was loaded
        want = embedded.predict(MESSAGES, {"max_tokens": 6})
        got_sync = remote.predict(MESSAGES, {"max_tokens": 6})
        got_async = await remote.apredict(MESSAGES, {"max_tokens": 6})
        for got in (got_sync, got_async):
            assert got.text == want.text
            assert [e["token"] for e in got.logprobs] == [e["token"] for e in want.logprobs]
            assert got.confidence == pytest.approx(want.confidence, abs=1e-4)
        # a second gateway replica loading the same version is not an error
        again = load_student(artifact["dir"], backend="vllm", vllm_base_url=server.url)
        again.unload_on_close = False
        again.close()
    finally:
        remote.close()  # a retired version: its adapter is unloaded
        embedded.close()
    assert "orders-v1" not in state.adapters


def test_full_weight_artifacts_are_refused_by_the_vllm_backend(artifact, tmp_path):
    import gateway.vllm_backend  # noqa: F401
    from router.artifact import load_manifest, write_manifest
    from router.student import StudentError, load_student

    d = tmp_path / "full"
    shutil.copytree(artifact["dir"], d)
    manifest = load_manifest(d)
    manifest.pop("files")
    manifest.pop("format")
    write_manifest(d, {**manifest, "weights": "full"})
    with pytest.raises(StudentError, match="only LoRA adapters"):
        load_student(d, backend="vllm", vllm_base_url="http://127.0.0.1:9")


def test_the_standin_speaks_openai_to_the_official_client(vllm, artifact):
    """Wire check: the official ``openai`` client reads the stand-in's answers, logprobs included."""
    import openai

    server, _ = vllm
    httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "orders-v1", "lora_path": str(artifact["dir"] / "adapter")}).raise_for_status()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="orders-v1", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    assert resp.choices[0].logprobs.content and len(resp.choices[0].logprobs.content[0].top_logprobs) == 3
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
