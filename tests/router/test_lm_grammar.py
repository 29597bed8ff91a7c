"""The answer grammar of structured LM students (router/lm_grammar.py), without a model: every teacher
answer it covers is encoded and walked back to the same JSON text, every walk it allows ends in valid
JSON of the route's shape, and a free-text LM student never serves unparsable JSON on a JSON route.

The tokenizer is the tiny BPE one bench.tiny trains in a second on the fixture's own texts.
"""

from __future__ import annotations

import json
import random

import pytest

from tests import extraction


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from bench.tiny import build_tiny_model

    rows = extraction.pairs(300, seed=3)
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-tok"), extraction.corpus(rows), vocab_size=400,
                            hidden_size=32, layers=1, heads=2, intermediate_size=64)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def route(tokenizer):
    from distiller.lm.structured import induce_schema
    from router.template import learn_template

    rows = extraction.pairs(300, seed=3)
    template = learn_template([r["messages"] for r in rows])
    texts = [template.strip(r["messages"]) for r in rows]
    answers = [r["answer"] for r in rows]
    return induce_schema(tokenizer, texts, answers), texts, answers


def test_the_schema_is_learned_from_the_answers(route):
    schema, texts, _ = route
    assert texts[0] == extraction.pairs(1, seed=3)[0]["messages"][-1]["content"]  # the system prompt is stripped
    assert schema.first_key == "intent" and schema.required == ["intent"]
    assert schema.enum_values["intent"] == ['"book_flight"', '"book_hotel"', '"rent_car"']
    assert {"city", "date", "passengers", "nights", "car_type"} <= set(schema.copy_keys)
    assert schema.list_keys == {"city"} and schema.monotone and schema.coverage == 1.0
    assert schema.json_format.get("separators") == [", ", ": "]


def test_every_answer_walks_back_to_the_teachers_exact_text(tokenizer, route):
    from router.lm_grammar import Grammar, GrammarState, Request, RouteSchema, encode_answer

    schema, texts, answers = route
    schema = RouteSchema.from_dict(json.loads(json.dumps(schema.to_dict())))  # as the artifact ships it
    for text, answer in zip(texts, answers):
        req = Request.make(tokenizer, text)
        ids, in_order = encode_answer(schema, req, answer)
        assert in_order and ids[-1] == schema.eos_id
        g, st = Grammar(schema, req), GrammarState()
        for tok in ids:
            assert tok in g.allowed(st), (text, answer)
            g.advance(st, tok)
        assert st.phase == "done" and g.to_json(st) == answer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_walk_the_grammar_allows_is_valid_json_of_the_routes_shape(tokenizer, route, seed):
    from router.lm_decode import max_steps_for
    from router.lm_grammar import Grammar, GrammarState, Request

    schema, texts, _ = route
    rng = random.Random(seed)
    odd = ["", "paris paris paris", "réserver un hôtel à paris", "a b c d e f g h i j k l m n o p", "?!", "  x  "]
    for text in odd + texts[:60]:
        req = Request.make(tokenizer, text)
        g, st = Grammar(schema, req), GrammarState()
        steps = 0
        while st.phase != "done":
            allowed = g.allowed(st)
            assert allowed, (text, st)
            g.advance(st, rng.choice(allowed))
            steps += 1
            assert steps <= max_steps_for(schema, req), text
        obj = json.loads(g.to_json(st))
        assert isinstance(obj, dict) and set(obj) <= set(schema.keys) and json.dumps(obj["intent"]) in schema.enum_values["intent"]
        for key, value in obj.items():
            assert isinstance(value, str) or key in schema.list_keys
            if key in schema.copy_keys:
                assert all(v in text for v in (value if isinstance(value, list) else [value]))


def test_extraction_routes_are_told_from_label_routes():
    from distiller.lm.structured import looks_like_extraction

    rows = extraction.pairs(200, seed=4)
    yes, why = looks_like_extraction([r["messages"][-1]["content"] for r in rows], [r["answer"] for r in rows])
    assert yes and "city" in why
    texts = [f"my card {i} was declined" for i in range(100)]
    label_json = [json.dumps({"intent": "card_declined", "urgent": i % 2 == 0}) for i in range(100)]
    assert looks_like_extraction(texts, label_json)[0] is False
    assert looks_like_extraction(texts, ["card_declined"] * 100)[0] is False


def test_a_free_text_lm_student_on_a_json_route_escalates_unparsable_answers(monkeypatch, tmp_path):
    """The plain (unconstrained) LM student: on a JSON route an answer that does not parse raises
    StudentError (the gateway escalates it), one that parses is served."""
    import router.lm_student as lm_student
    from router.lm_engine import Generation
    from router.student import StudentError

    class Engine:
        def generate(self, messages, **kw):
            return [Generation(text=m[-1]["content"], logprobs=[], token_logprobs=[-0.1, -0.2], prompt_tokens=3,
                               completion_tokens=2, finish_reason="stop") for m in messages]

    monkeypatch.setattr(lm_student.LMEngine, "from_artifact", classmethod(lambda cls, *a, **k: Engine()))
    for answer_format, bad_served in (("json", False), ("text", True)):
        student = lm_student.EmbeddedLMStudent(tmp_path, {"route": "r", "version": 1, "answer_format": answer_format})
        try:
            assert json.loads(student.predict([{"role": "user", "content": '{"a": 1}'}], {}).text) == {"a": 1}
            if bad_served:
                assert student.predict([{"role": "user", "content": '{"a": 1'}], {}).text == '{"a": 1'
            else:
                with pytest.raises(StudentError, match="not valid JSON"):
                    student.predict([{"role": "user", "content": '{"a": 1'}], {})
        finally:
            student.close()


def test_after_the_intent_only_its_own_keys_are_allowed(tokenizer, route):
    """``keys_given``: a hotel booking never gets ``passengers`` or ``car_type``, whatever the model
    prefers; a schema shipped without it (older artifacts) allows every key."""
    from router.lm_grammar import Grammar, GrammarState, Request, RouteSchema

    schema, texts, _ = route
    assert set(schema.keys_given['"book_hotel"']) == {"intent", "city", "date", "nights"}
    assert set(schema.keys_given['"rent_car"']) == {"intent", "city", "date", "car_type"}
    shipped = RouteSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert shipped.keys_given == schema.keys_given
    req = Request.make(tokenizer, "rent a car in paris for 3 nights")
    for s, allowed_keys in ((shipped, {"city", "date", "car_type"}), (RouteSchema.from_dict(
            {k: v for k, v in schema.to_dict().items() if k != "keys_given"}), set(schema.copy_keys))):
        g, st = Grammar(s, req), GrammarState()
        g.advance(st, s.enum_id[("intent", '"rent_car"')])
        g.advance(st, req.ids[req.starts.index(True, 1)])  # a span's first token: which keys may end it?
        while st.phase == "copy" and not any(t in s.id_key for t in g.allowed(st)):
            g.advance(st, next(t for t in g.allowed(st) if t < s.base_vocab))
        keys = {s.id_key[t] for t in g.allowed(st) if t in s.id_key}
        assert keys == allowed_keys & set(s.copy_keys), keys
