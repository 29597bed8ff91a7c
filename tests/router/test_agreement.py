"""The one definition of agreement (issue 14): labels, JSON key order, whitespace, case, free text."""

from __future__ import annotations

import pytest

from router.agreement import agreement_kind, answers_agree, canonical


@pytest.mark.parametrize("student, teacher, agree", [
    ("refund_request", "refund_request", True),
    ("Refund_Request ", "refund_request", True),
    ("refund  request", "refund request", True),
    ("refund_request", "refund_requests", False),
    ("", "", True),
])
def test_labels_fold_case_and_whitespace(student, teacher, agree):
    assert answers_agree("label", student, teacher) is agree


@pytest.mark.parametrize("student, teacher, agree", [
    ('{"intent": "PlayMusic", "artist": "helen carter"}', '{"artist":"helen carter","intent":"PlayMusic"}', True),
    ('{"a": 1}', '{"a": 1.0}', True),
    ('{"a": true}', '{"a": 1}', False),
    ('{"a": [1, 2]}', '{"a": [2, 1]}', False),
    ('{"city": "Paris"}', '{"city": "paris"}', False),  # extracted values are data: case matters
    ('{"city": "Paris" }', '{ "city":"Paris"}', True),
    ('{"city": "Paris"', '{"city": "Paris"', False),  # does not parse: agrees with nothing
    ('["a"]', '["a"]', True),
])
def test_json_compares_parsed_values(student, teacher, agree):
    assert answers_agree("json", student, teacher) is agree


@pytest.mark.parametrize("student, teacher, agree", [
    ("Yes.", "yes.", True),
    ("The meeting is  on\nMonday", "the meeting is on monday", True),
    ("ﬁne", "fine", True),  # NFKC: the ligature is the two letters
    ("The meeting is on Monday.", "The meeting is on Tuesday.", False),
    ("the cat sat " * 20, "a cat sat " * 20, False),  # long answers too: similar is not the same
])
def test_free_text_is_normalised_exact_match(student, teacher, agree):
    assert answers_agree("text", student, teacher) is agree


def test_missing_answers_never_agree_and_kinds_map():
    assert not answers_agree("label", None, "x") and not answers_agree("json", "{}", None)
    assert [agreement_kind(k) for k in ("label", "structured")] == ["label", "json"]
    assert agreement_kind("lm", "json") == "json" and agreement_kind("lm", None) == "text"
    with pytest.raises(ValueError):
        canonical("semantic", "x")


TRICKY = [
    ("structured", '["A"]', '[ "A" ]'),
    ("structured", '{"a": 1.0}', '{"a": 1}'),
    ("structured", '{"a": "X"}', '{"a": "x"}'),
    ("label", "Card_Declined ", "card_declined"),
    ("lm", "The cat sat " * 12, "A cat sat " * 12),
]


@pytest.mark.parametrize("kind, student, teacher", TRICKY)
def test_validation_and_the_live_monitor_judge_a_pair_alike(kind, student, teacher):
    """Issue 14: the distiller's validation (label key / JSON) and the gateway's shadow checks and
    drift monitor (case-folded text, canonical {...} only) could disagree about the same pair."""
    from distiller.evaluate import agreement_vector
    from gateway.students import LiveStudent

    live = LiveStudent(route="r", version=1, kind=kind, checksum="", student=None, metrics={}, curve=[],
                       agreement=agreement_kind(kind))
    assert bool(agreement_vector(kind, [student], [teacher])[0]) == live.agrees(student, teacher)
