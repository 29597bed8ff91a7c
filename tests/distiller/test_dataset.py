"""Datasets from the ledger, task detection and soft labels (no model needed)."""

from __future__ import annotations

import json
import math

import pytest

from distiller.config import ConfigError, DistillerConfig
from distiller.dataset import NotEnoughData, load_route_dataset, unusable_reason
from distiller.detect import detect_task, soft_label_distribution
from distiller.pipeline import distill_route
from distiller.train import prepare_targets
from tests.distiller.conftest import seed_exchanges
from tests.sql import sql_value

SYSTEM = "You label support tickets. Answer with one word."


WORDS = ["card", "late", "refund", "pin", "app", "cash", "rate", "fee", "help", "why", "still", "blocked"]


def _words(i: int) -> str:
    return " ".join(WORDS[(i * k + k * k) % len(WORDS)] for k in range(1, 4 + i % 5)) + f" {i}"


def _req(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Ticket: {text}"}]


def test_usable_pairs_dedup_and_time_split(ledger) -> None:
    rows = [{"messages": _req(_words(i)), "answer": "card"} for i in range(60)]
    rows.append({"messages": _req(_words(5).upper().replace(" ", "  ")), "answer": "other"})  # a repeat, newer
    rows.append({"messages": _req("cut off"), "answer": "car", "finish_reason": "length"})
    rows.append({"messages": _req("refused"), "answer": "I'm sorry, I can't help with that."})
    rows.append({"messages": _req("error"), "answer": "x", "status": 500})
    seed_exchanges(ledger, "tickets", rows)
    ds = load_route_dataset(ledger, "tickets", DistillerConfig(min_pairs=10, val_fraction=0.25, min_val_pairs=5,
                                                                    val_split="newest"))
    assert ds.dropped == {"truncated": 1, "refusal": 1, "duplicate": 1}
    assert len(ds.train) + len(ds.val) == 60
    assert all(a.id < b.id for a, b in zip(ds.examples, ds.examples[1:]))
    assert max(e.id for e in ds.train) < min(e.id for e in ds.val)  # the newest pairs validate
    assert len(ds.val) == 15
    # the template is stripped: the student sees only what varies; the newest duplicate wins
    assert ds.examples[0].text == _words(0)
    assert [e.answer for e in ds.examples if e.text.lower().split() == _words(5).split()] == ["other"]


def test_pii_scrubbing_per_route(ledger) -> None:
    rows = [{"messages": _req(f"{_words(i)} reach me at user{i}@mail.com or +1 415 555 01{i % 10}{i % 7}"),
             "answer": "contact"} for i in range(30)]
    seed_exchanges(ledger, "contact", rows)
    ds = load_route_dataset(ledger, "contact", DistillerConfig(min_pairs=5, pii_scrub=True))
    assert _words(0) + " reach me at [EMAIL] or [PHONE]" in {e.text for e in ds.examples}
    assert not any("@" in e.text or "555" in e.text for e in ds.examples)


def test_route_with_three_pairs_is_refused_clearly(ledger, fast_config) -> None:
    seed_exchanges(ledger, "tiny", [{"messages": _req(f"t{i}"), "answer": "a"} for i in range(3)])
    report = distill_route(ledger, "tiny", fast_config)
    assert report.status == "insufficient"
    assert (report.have, report.need) == (3, 50)
    assert "3 usable teacher pair(s)" in report.message and "at least 50" in report.message
    assert sql_value(ledger, "SELECT count(*) FROM students") == 0
    assert ledger.events("tiny")[0]["kind"] == "distill.insufficient"
    with pytest.raises(NotEnoughData):
        load_route_dataset(ledger, "tiny", fast_config)


def test_unusable_reasons() -> None:
    assert unusable_reason("", "stop") == "empty"
    assert unusable_reason("positive", "length") == "truncated"
    assert unusable_reason("As an AI model I cannot", "stop") == "refusal"
    assert unusable_reason("positive", "stop") is None


def test_detection_label_structured_free_text() -> None:
    cfg = DistillerConfig()
    label = detect_task(["Positive", "negative", "positive ", "Negative", "positive", "Negative"] * 10, cfg)
    assert label.kind == "label" and label.surfaces == {"positive": "positive", "negative": "Negative"}

    answers = [json.dumps({"intent": i, "urgent": u}, separators=(",", ":")) for i in ("a", "b", "c") for u in (True, False)] * 5
    st = detect_task(answers, cfg)
    assert st.kind == "structured" and st.fields == ["intent", "urgent"]
    assert st.json_format["separators"] == [",", ":"] and st.format_match == 1.0

    free = detect_task([f"Dear customer, your order {i} ships on day {i}." for i in range(50)], cfg)
    assert free.kind == "free_text" and "repeat" in free.reason

    long_field = detect_task([json.dumps({"label": "a", "note": f"note {i}"}) for i in range(40)], cfg)
    assert long_field.kind == "free_text" and "'note'" in long_field.reason


def _lp(token_probs: dict[str, float]) -> list[dict]:
    tops = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in token_probs.items()]
    return [{"token": tops[0]["token"], "logprob": tops[0]["logprob"], "bytes": None, "top_logprobs": tops}]


def test_soft_labels_from_first_token_logprobs() -> None:
    keys = ["negative", "positive", "card_arrival", "card_linking"]
    dist = soft_label_distribution(_lp({"positive": 0.7, "negative": 0.2, "neutral": 0.1}), "positive", keys)
    assert dist == pytest.approx({"positive": 0.7 / 0.9, "negative": 0.2 / 0.9})
    # a first token shared by several labels keeps the teacher's own choice
    dist = soft_label_distribution(_lp({"card": 0.9, "positive": 0.1}), "card_arrival", keys)
    assert dist == pytest.approx({"card_arrival": 0.9, "positive": 0.1})
    assert soft_label_distribution(None, "positive", keys) is None


def test_label_set_growth_and_rare_labels_in_targets() -> None:
    from distiller.dataset import Example

    train = [Example(id=i, messages=[], answer="a" if i % 2 else "b") for i in range(20)]
    train.append(Example(id=20, messages=[], answer="c", logprobs=_lp({"c": 0.6, "a": 0.4})))
    det = detect_task([e.answer for e in train], DistillerConfig(min_repeated_share=0.5))
    (head,) = prepare_targets(det, train)
    assert head.classes == ["a", "b", "c"] and head.counts.tolist() == [10, 10, 1]
    assert head.soft_rows == 1
    assert head.targets[-1].tolist() == pytest.approx([0.4, 0.0, 0.6])


def test_config_rejects_unknown_keys_and_applies_route_overrides() -> None:
    with pytest.raises(ConfigError, match="Unknown distiller setting.*min_pair"):
        DistillerConfig.from_dict({"min_pair": 3})
    with pytest.raises(ConfigError, match="min_pairs must be a int"):
        DistillerConfig.from_dict({"min_pairs": "many"})
    cfg = DistillerConfig().for_route({"target_agreement": 0.95, "distill": {"min_pairs": 80, "pii_scrub": True}})
    assert (cfg.target_agreement, cfg.min_pairs, cfg.pii_scrub) == (0.95, 80, True)
    assert DistillerConfig().for_route({"target_confidence": 0.8}).target_confidence == 0.8
    assert DistillerConfig().for_route({"target_confidence": None}).target_confidence == 0.95  # unset: the default
    with pytest.raises(ConfigError, match="target_confidence"):
        DistillerConfig().for_route({"target_confidence": 0.3})
    assert "min_pairs" in DistillerConfig.help()


def _examples(n: int, checks_at: set[int]) -> list:
    from distiller.dataset import Example

    return [Example(id=i, messages=_req(_words(i)), answer="card", weight=50.0 if i in checks_at else 1.0)
            for i in range(n)]


def test_validation_reaches_back_for_shadow_checks_in_cascade_mode() -> None:
    from distiller.dataset import build_dataset

    cfg = DistillerConfig(min_pairs=10, val_fraction=0.2, min_val_checks=10, val_split="newest")
    # shadow mode (no checks): the plain newest fifth
    plain = build_dataset("r", _examples(200, set()), cfg)
    assert len(plain.val) == 40 and plain.val_reach_back == 0 and plain.val_checks == 0
    # cascade: a check every 8th pair; the newest fifth holds 5, so the split reaches back to the 10th newest
    checks = set(range(3, 200, 8))
    ds = build_dataset("r", _examples(200, checks), cfg)
    assert ds.val_checks == 10 and ds.val[0].id == sorted(checks)[-10]
    assert ds.val_reach_back == len(ds.val) - 40 and max(e.id for e in ds.train) < ds.val[0].id
    # never past half the pairs, nor to pairs a reusable fine-tuned encoder was trained on
    assert len(build_dataset("r", _examples(200, checks), cfg.with_overrides({"min_val_checks": 1000})).val) == 100
    floored = build_dataset("r", _examples(200, checks), cfg, val_floor_id=150)
    assert floored.val[0].id == 151 and floored.val_checks == 6
    # enough checks already, or the setting off: the plain split
    assert build_dataset("r", _examples(200, checks), cfg.with_overrides({"min_val_checks": 5})).val_reach_back == 0
    assert build_dataset("r", _examples(200, checks), cfg.with_overrides({"min_val_checks": 0})).val_reach_back == 0


def test_holdout_split_holds_out_the_same_prompts_in_every_version() -> None:
    """val_split "holdout": a fixed share of the route's prompts, chosen by a hash of the prompt,
    validates in every version; as the route grows a held-out prompt may go to training once the
    cap binds, never the other way, and a repeat of a prompt lands on the same side."""
    from distiller.dataset import build_dataset, holdout_fraction, holdout_share

    cfg = DistillerConfig(min_pairs=10, val_split="holdout", val_fraction=0.2, min_val_pairs=20, max_val_pairs=400)
    fractions = [holdout_fraction(n, cfg) for n in (10, 50, 100, 1000, 2000, 4000, 10**6)]
    assert fractions[:3] == [0.5, 0.4, 0.2] and fractions[3] == 0.2 and fractions[4] == 0.2 and fractions[5] == 0.1
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    trained: set[str] = set()
    for n in (200, 1000, 3000):
        ds = build_dataset("r", _examples(n, set()), cfg)
        assert ds.val_split == "holdout" and ds.holdout_fraction == holdout_fraction(n, cfg)
        val_texts = {e.text for e in ds.val}
        assert not val_texts & trained  # nothing an earlier version trained on validates now
        trained |= {e.text for e in ds.train}
        assert all(holdout_share(e.text) < ds.holdout_fraction for e in ds.val)
        # spread over the route's whole life, not its newest pairs
        assert min(e.id for e in ds.val) < n // 10 and abs(len(ds.val) - n * ds.holdout_fraction) < 4 * n ** 0.5
        assert all(a.id < b.id for a, b in zip(ds.val, ds.val[1:]))
    assert holdout_share("Card  LATE") == holdout_share("card late")  # the dedup key decides
    # a small route still gets pairs on both sides
    tiny = build_dataset("r", _examples(10, set()), cfg.with_overrides({"min_pairs": 4}))
    assert tiny.val and tiny.train


def test_checks_sampled_by_confidence_are_weighted_by_their_inverse_probability():
    """A version's checks stand for its served answers; where each check recorded the probability it
    was sampled with, a rarely sampled (confident) one stands for more of them than one near the
    threshold, and the version's total is unchanged. Teacher answers and checks without a
    probability keep their weights."""
    from distiller.dataset import _weigh_checks_by_probability
    from store.types import Pair

    def pair(i: int, weight: float, served_by: str = "student") -> Pair:
        return Pair(i, float(i), "r", [], "a", "stop", None, served_by, weight)

    pairs = [pair(1, 1.0, "teacher"), pair(2, 30.0), pair(3, 30.0), pair(4, 30.0), pair(5, 50.0)]
    probabilities = {2: (1, 0.01), 3: (1, 0.04), 4: (1, 0.04)}  # 5: a flat-rate check (no probability)
    out = {p.id: p.weight for p in _weigh_checks_by_probability(pairs, probabilities)}
    assert out[1] == 1.0 and out[5] == 50.0
    assert out[2] == pytest.approx(4 * out[3]) and out[3] == out[4]
    assert out[2] + out[3] + out[4] == pytest.approx(90.0)
    assert _weigh_checks_by_probability(pairs, {}) == pairs
