"""LM students, the fast parts: config, chat rendering and loss masks, token alignment for KL,
confidence features, calibration, the routing curve and the promotion gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import synthetic
from distiller.lm.config import ConfigError, LMTrainConfig, preset
from tests.sql import sql_value


# -- config -------------------------------------------------------------------------------------
def test_presets_exist_and_differ():
    tiny, small, big = preset("tiny-cpu"), preset("lora-small"), preset("lora-7b")
    assert tiny.method == "full" and small.method == "lora" and big.method == "lora"
    assert big.lora_r > small.lora_r


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="learning_rat.*did you mean 'learning_rate'"):
        LMTrainConfig.from_dict({"learning_rat": 1e-3})


def test_unknown_preset_and_bad_values_are_errors():
    with pytest.raises(ConfigError, match="known presets"):
        preset("huge")
    with pytest.raises(ConfigError, match="method"):
        LMTrainConfig.from_dict({"method": "qlora"})


def test_from_dict_overrides_a_preset():
    cfg = LMTrainConfig.from_dict({"epochs": 2}, preset_name="tiny-cpu")
    assert cfg.epochs == 2 and cfg.method == "full"
    assert cfg.fingerprint() != preset("tiny-cpu").fingerprint()


# -- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from bench.tiny import build_tiny_model

    items = synthetic.examples(200)
    corpus = [f"{synthetic.SYSTEM_PROMPT} {e.messages[-1]['content']} {e.answer}" for e in items]
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, hidden_size=32, layers=1)
    return AutoTokenizer.from_pretrained(path)


def test_loss_is_on_the_answer_and_end_of_turn_only(tokenizer):
    from distiller.lm.data import IGNORE, build_example

    ex = synthetic.examples(1, seed=3)[0]
    e = build_example(tokenizer, ex.messages, ex.answer, max_seq_len=256)
    target = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE]
    assert tokenizer.decode(target) == ex.answer + "<|end|>"
    prompt = tokenizer.decode(e.input_ids[: len(e.input_ids) - len(target)])
    assert prompt.endswith("<|assistant|>") and ex.messages[-1]["content"] in prompt
    assert build_example(tokenizer, ex.messages, ex.answer, max_seq_len=10) is None


def _teacher_logprobs_from(tokenizer, answer: str) -> list[dict]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    out = []
    for tid in ids:
        tok = tokenizer.decode([tid])
        alt = tokenizer.decode([(tid + 7) % 300 + 10])
        out.append(
            {
                "token": tok,
                "logprob": -0.05,
                "bytes": list(tok.encode()),
                "top_logprobs": [{"token": tok, "logprob": -0.05}, {"token": alt, "logprob": -3.0}],
            }
        )
    return out


def test_teacher_top_logprobs_align_when_tokenizers_match(tokenizer):
    from distiller.lm.data import TokenMap, build_example

    ex = synthetic.examples(1, seed=4)[0]
    lp = _teacher_logprobs_from(tokenizer, ex.answer)
    e = build_example(tokenizer, ex.messages, ex.answer, max_seq_len=256, teacher_logprobs=lp, token_map=TokenMap(tokenizer))
    assert len(e.teacher) == len(lp)
    pos, ids, probs = e.teacher[0]
    assert e.input_ids[pos + 1] == ids[0]  # logits at pos predict the first answer token
    assert math.isclose(sum(probs), 1.0) and probs[0] > 0.9


def test_teacher_logprobs_from_another_tokenizer_fall_back_to_sequence(tokenizer):
    from distiller.lm.data import TokenMap, build_example

    ex = synthetic.examples(1, seed=5)[0]
    chars = [{"token": c, "logprob": -0.1, "top_logprobs": [{"token": c, "logprob": -0.1}]} for c in ex.answer]
    e = build_example(tokenizer, ex.messages, ex.answer, max_seq_len=256, teacher_logprobs=chars, token_map=TokenMap(tokenizer))
    assert e.teacher == []


# -- confidence ---------------------------------------------------------------------------------
def test_logprob_features_are_length_aware():
    from router.lm_student import FEATURE_NAMES, logprob_features

    short, long = logprob_features([-0.1, -0.2]), logprob_features([-0.1, -0.2] * 20)
    assert len(short) == len(FEATURE_NAMES)
    assert short[0] == pytest.approx(long[0]) and short[1] == pytest.approx(long[1])  # mean, min: no length bias
    assert long[-1] > short[-1]
    assert logprob_features([float("-inf")])[1] == -50.0


def test_an_answer_in_two_orders_adds_their_agreement_and_the_other_orders_weakest_decision():
    from router.lm_confidence import answer_feature_names, answer_features, decision_features
    from router.lm_decode import Decision, Result

    decisions = [Decision("label", 1, -0.1, 3, 1.0), Decision("first", 2, -0.7, 5, 0.2)]
    one = Result(decisions=decisions, complete=True)
    assert answer_features(one).tolist() == decision_features(decisions).tolist()
    assert len(answer_feature_names(1)) == len(answer_features(one))
    two = Result(decisions=decisions, complete=True, views_agree=False,
                 alt_decisions=[Decision("key", 3, -2.5, 4, 0.1), Decision("end", 4, -0.3, 2, 0.5)])
    feats = answer_features(two)
    assert len(feats) == len(answer_feature_names(2)) == len(decision_features(decisions)) + 2
    assert feats[-2:].tolist() == [0.0, -2.5]


def test_structured_settings_name_an_answer_order():
    from distiller.lm.structured import StructuredConfig

    assert StructuredConfig().answer_order == "both" and StructuredConfig().epochs == 3.0
    with pytest.raises(ConfigError, match="answer_order must be one of key_first, value_first, both"):
        StructuredConfig.from_dict({"answer_order": "keys_first"})


def test_calibrator_separates_and_round_trips_through_json():
    from distiller.lm.evaluate import auroc, fit_calibrator
    from router.lm_student import Calibrator, logprob_features

    rng = np.random.default_rng(0)
    good = [logprob_features(rng.normal(-0.05, 0.02, 12)) for _ in range(60)]
    bad = [logprob_features(np.r_[rng.normal(-0.05, 0.02, 10), rng.normal(-2.5, 0.5, 2)]) for _ in range(20)]
    x, y = np.vstack(good + bad), np.r_[np.ones(60), np.zeros(20)]
    emb = rng.normal(size=(80, 16)).astype(np.float32)
    cal = fit_calibrator(x, y, embeddings=emb, embedding_model="test-embedder", components=3)
    p = cal.predict(x, emb)
    assert auroc(p, y) > 0.95
    again = Calibrator.from_json(json.loads(json.dumps(cal.to_json())))
    assert np.allclose(again.predict(x, emb), p)
    assert again.uses_embedding and len(again.components) == 3


def test_one_outcome_gives_a_constant_calibrator():
    from distiller.lm.evaluate import fit_calibrator

    cal = fit_calibrator(np.zeros((8, 6)), np.ones(8))
    assert cal.kind == "constant" and cal.predict(np.zeros((2, 6))).tolist() == [0.9, 0.9]


def test_curve_and_target():
    from distiller.lm.evaluate import at_target, coverage_curve, expected_calibration_error, normalize

    conf = np.array([0.99, 0.95, 0.9, 0.6, 0.3])
    agree = np.array([1, 1, 1, 0, 1])
    curve = coverage_curve(conf, agree)
    assert [round(c["coverage"], 2) for c in curve] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert at_target(curve, 0.98) == (0.6, 0.9)
    assert at_target(coverage_curve(conf, np.zeros(5)), 0.5) == (0.0, 1.0)
    assert 0 <= expected_calibration_error(conf, agree) <= 1
    assert normalize("  Hello\u00a0 World ") == "hello world"


def test_lm_agreement_is_the_projects_one_definition():
    """Issue 14: long free-text answers used to agree by embedding cosine in validation while the
    gateway's shadow checks compared them exactly; both use router.agreement now."""
    from distiller.lm import evaluate

    long_a = "the cat " + "word " * 40
    agree = evaluate.agreement([long_a, long_a, "Yes."], [long_a.upper() + " ", "a cat " + "word " * 40, "yes."])
    assert agree.tolist() == [True, False, True]
    assert evaluate.answer_format(['{"a": 1}', '{"b": "x"}']) == "json" and evaluate.answer_format(["hi", "{}"]) == "text"
    js = evaluate.agreement(['{"a": 1, "b": "X"}'], ['{"b": "X", "a": 1}'], kind="json")
    assert js.tolist() == [True]


# -- registry gate ------------------------------------------------------------------------------
def test_promotion_gate(tmp_path):
    from distiller.lm.registry import live_student, next_version, register_student
    from store import Ledger

    from router.artifact import write_manifest

    ledger = Ledger(tmp_path / "l.db")

    def add(cov: float) -> str:
        v = next_version(ledger, "r")
        art = tmp_path / f"v{v}"  # promotion verifies the artifact, so each version has a real one
        art.mkdir()
        (art / "weights.json").write_text("{}")
        checksum = write_manifest(art, {"kind": "lm", "route": "r", "version": v})
        row = register_student(
            ledger, route="r", version=v, kind="lm", train_pairs=1, val_pairs=1,
            metrics={"coverage_at_target": cov}, curve=[], calibration={}, artifact_path=str(art), checksum=checksum,
        )
        return row["status"]

    assert add(0.0) == "candidate"  # no live version, but covers nothing
    assert add(0.5) == "live"
    assert add(0.4) == "candidate"
    assert add(0.7) == "live"
    assert live_student(ledger, "r")["version"] == 4
    assert sql_value(ledger, "SELECT status FROM students WHERE version = 2") == "retired"


def test_structured_students_train_in_bf16_only_where_the_hardware_has_the_kernels(monkeypatch):
    """Without bf16 kernels (an AVX2-only CPU) bf16 products are emulated ~100x slower than float32:
    SmolLM2 trained at 5 tokens/s instead of ~170 there."""
    import router.lm_decode
    from distiller.lm.structured import train_dtype

    monkeypatch.setattr(router.lm_decode, "bf16_packing_available", lambda: False)
    assert train_dtype("lora", "cpu") == ("float32", "eager")
    monkeypatch.setattr(router.lm_decode, "bf16_packing_available", lambda: True)
    assert train_dtype("lora", "cpu") == ("bfloat16", "eager")
    assert train_dtype("lora", "cuda") == ("bfloat16", "sdpa")
    assert train_dtype("full", "cpu")[0] == train_dtype("full", "cuda")[0] == "float32"  # tiny bases, full fine-tuning
