"""LM student training: resume from a checkpoint, token-level KL selection, LoRA adapters."""

from __future__ import annotations

import dataclasses

import pytest

from bench import synthetic
from distiller.lm.config import preset
from tests.sql import sql_value


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from bench.tiny import build_tiny_model

    items = synthetic.examples(200)
    corpus = [f"{synthetic.SYSTEM_PROMPT} {e.messages[-1]['content']} {e.answer}" for e in items]
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, hidden_size=32, layers=1, intermediate_size=64)


def _examples(base, n=32, teacher_logprobs=False):
    from transformers import AutoTokenizer

    from distiller.lm.data import build_examples
    from store import Pair

    tok = AutoTokenizer.from_pretrained(base)
    items = synthetic.examples(n, seed=11)
    pairs = []
    for i, e in enumerate(items):
        lp = None
        if teacher_logprobs:
            ids = tok(e.answer, add_special_tokens=False)["input_ids"]
            lp = [{"token": tok.decode([t]), "logprob": -0.01, "top_logprobs": [{"token": tok.decode([t]), "logprob": -0.01}]} for t in ids]
        pairs.append(Pair(i, float(i), "r", e.messages, e.answer, "stop", lp, "teacher"))
    return build_examples(tok, pairs, max_seq_len=128, use_teacher_logprobs=True)


def _cfg(base, **kw):
    return dataclasses.replace(preset("tiny-cpu"), base_model=str(base), progress=False, batch_size=8, **kw)


def test_resume_continues_exactly_where_it_stopped(base, tmp_path):
    import torch

    from distiller.lm.train import TrainingInterrupted, train_lm

    examples, _ = _examples(base)
    cfg = _cfg(base, max_steps=6, checkpoint_every=3)
    full = train_lm(cfg, examples, tmp_path / "a")
    with pytest.raises(TrainingInterrupted):
        train_lm(cfg, examples, tmp_path / "b", stop_after_step=4)  # dies after step 4; checkpoint at 3
    assert (tmp_path / "b" / "checkpoint" / "checkpoint.json").is_file()
    resumed = train_lm(cfg, examples, tmp_path / "b")
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    for (n1, p1), (n2, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-6), n1


def test_a_checkpoint_from_other_settings_is_not_resumed(base, tmp_path):
    from distiller.lm.train import TrainingInterrupted, train_lm

    examples, _ = _examples(base)
    with pytest.raises(TrainingInterrupted):
        train_lm(_cfg(base, max_steps=4, checkpoint_every=2), examples, tmp_path, stop_after_step=2)
    again = train_lm(_cfg(base, max_steps=4, checkpoint_every=2, learning_rate=1e-3), examples, tmp_path)
    assert again.resumed_from == 0


def test_token_kl_is_used_when_teacher_logprobs_align(base, tmp_path):
    import math

    from distiller.lm.train import train_lm

    examples, stats = _examples(base, teacher_logprobs=True)
    assert stats["kl_aligned"] == stats["kl_logged"] == len(examples)
    result = train_lm(_cfg(base, max_steps=2, checkpoint_every=0), examples, tmp_path)
    assert result.distillation == "token-kl" and all(math.isfinite(x) for x in result.losses)
    plain, _ = _examples(base)
    assert train_lm(_cfg(base, max_steps=1, checkpoint_every=0), plain, tmp_path / "p").distillation == "sequence"


def test_lora_adapter_is_saved_as_safetensors_and_loads(base, tmp_path):
    from router.lm_student import LMEngine

    from distiller.lm.train import save_student_weights, train_lm

    examples, _ = _examples(base, n=16)
    cfg = _cfg(base, method="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"], max_steps=2, checkpoint_every=0)
    result = train_lm(cfg, examples, tmp_path / "w")
    assert save_student_weights(result, cfg, tmp_path / "art") == "adapter"
    assert (tmp_path / "art" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "art").rglob("*.bin"))
    engine = LMEngine.from_parts(base_model=str(base), adapter_dir=tmp_path / "art" / "adapter", tokenizer_dir=tmp_path / "art" / "tokenizer", device="cpu")
    gen = engine.generate([synthetic.examples(1)[0].messages], max_tokens=5, top_logprobs=2)[0]
    assert 1 <= gen.completion_tokens <= 5 and len(gen.logprobs) == gen.completion_tokens
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in gen.logprobs)


def test_distill_records_token_kl_judge_cost_and_keeps_a_weak_student_as_candidate(base, tmp_path):
    from transformers import AutoTokenizer

    from distiller.lm.config import LMTrainConfig
    from distiller.lm.train import distill_lm_route
    from store import Ledger
    from router.artifact import load_manifest

    tok = AutoTokenizer.from_pretrained(base)

    def teacher_logprobs(answer):
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        return [{"token": tok.decode([t]), "logprob": -0.01, "bytes": [], "top_logprobs": [{"token": tok.decode([t]), "logprob": -0.01}]} for t in ids]

    ledger = Ledger(tmp_path / "ledger.db")
    synthetic.seed_ledger(ledger, "r", synthetic.examples(40, seed=2), teacher_logprobs=teacher_logprobs)
    config = LMTrainConfig.from_dict(
        {"base_model": str(base), "max_steps": 2, "progress": False, "prompt_embedding": False, "min_val_pairs": 10,
         "judge_sample": 4, "calibration_samples": 1, "max_new_tokens": 8},
        preset_name="tiny-cpu",
    )
    calls = []

    def judge(messages, teacher, student):
        calls.append((teacher, student))
        return teacher == student, 0.002

    summary = distill_lm_route(tmp_path / "ledger.db", "r", config, judge=judge, work_dir=tmp_path / "work")
    assert summary["status"] == "candidate"  # two steps from random init: it covers nothing
    assert summary["distillation"] == "token-kl" and summary["metrics"]["kl_pairs"] == 30
    assert len(calls) == 4 and summary["metrics"]["judge_cost_usd"] == pytest.approx(0.008)
    manifest = load_manifest(summary["artifact_path"], expected_checksum=summary["checksum"])
    assert manifest["distillation"] == "token-kl" and manifest["kind"] == "lm"
    assert sql_value(ledger, "SELECT status FROM students WHERE route = 'r'") == "candidate"
