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


@pytest.fixture(scope="module", params=["both", "key_first", "value_first"])
def route(tokenizer, request):
    from distiller.lm.structured import induce_schema
    from router.template import learn_template

    rows = extraction.pairs(300, seed=3)
    template = learn_template([r["messages"] for r in rows])
    texts = [template.strip(r["messages"]) for r in rows]
    answers = [r["answer"] for r in rows]
    return induce_schema(tokenizer, texts, answers, order=request.param), texts, answers


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
        for view in schema.views:
            ids, in_order = encode_answer(schema, req, answer, view)
            assert in_order and ids[-1] == schema.eos_id
            g, st = Grammar(schema, req, view), GrammarState()
            for tok in ids:
                assert tok in g.allowed(st), (text, answer, view)
                g.advance(st, tok)
            assert st.phase == "done" and g.to_json(st) == answer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_walk_the_grammar_allows_is_valid_json_of_the_routes_shape(tokenizer, route, seed):
    from router.lm_decode import max_steps_for
    from router.lm_grammar import Grammar, GrammarState, Request

    schema, texts, _ = route
    rng = random.Random(seed)
    odd = ["", "paris paris paris", "réserver un hôtel à paris", "a b c d e f g h i j k l m n o p", "?!", "  x  "]
    for text, view in [(t, v) for t in odd + texts[:60] for v in schema.views]:
        req = Request.make(tokenizer, text)
        g, st = Grammar(schema, req, view), GrammarState()
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
        if s.order == "value_first":  # a span's first token: which keys may end it?
            g.advance(st, req.ids[req.starts.index(True, 1)])
            while st.phase == "copy" and not any(t in s.id_key for t in g.allowed(st)):
                g.advance(st, next(t for t in g.allowed(st) if t < s.base_vocab))
        keys = {s.id_key[t] for t in g.allowed(st) if t in s.id_key}  # key first: which keys may open one?
        assert keys == allowed_keys & set(s.copy_keys), keys


def test_key_first_writes_each_key_before_its_span_and_ends_the_span(tokenizer):
    """Key first: ``[V:intent] [K:city] 'paris' [END] EOS``; after a copy key only span starts are
    allowed, inside a span only its continuations and [END] (never another key), and a schema shipped
    without ``order`` (older artifacts) reads as value first."""
    from distiller.lm.structured import induce_schema
    from router.lm_grammar import Grammar, GrammarState, Request, RouteSchema, encode_answer

    rows = extraction.pairs(300, seed=3)
    texts = [r["messages"][-1]["content"] for r in rows]
    answers = [r["answer"] for r in rows]
    s = induce_schema(tokenizer, texts, answers, order="key_first")
    assert s.end_id == s.eos_id + 1 and s.n_extra == s.end_id + 1 - s.base_vocab
    assert s.extra_token_names()[-2:] == ["<eos>", "<end>"]
    text = next(t for t, a in zip(texts, answers) if json.loads(a)["intent"] == "book_hotel")
    answer = answers[texts.index(text)]
    req = Request.make(tokenizer, text)
    ids, _ = encode_answer(s, req, answer)
    obj = json.loads(answer)
    copied = [k for k in obj if k in s.copy_keys]
    assert ids.count(s.end_id) == len(copied) and ids[-1] == s.eos_id
    for k in copied:  # the key's id comes right before its span, [END] right after
        at = ids.index(s.key_id[k])
        span = req.find_span(obj[k])
        assert ids[at + 1:at + 1 + span[1] - span[0]] == req.ids[span[0]:span[1]]
        assert ids[at + 1 + span[1] - span[0]] == s.end_id
    g, st = Grammar(s, req), GrammarState()
    for tok in ids:
        allowed = g.allowed(st)
        assert tok in allowed
        if st.phase == "first":
            assert all(t < s.base_vocab for t in allowed)
        if st.phase == "copy":
            assert not any(t in s.id_key for t in allowed)
        g.advance(st, tok)
    assert st.phase == "done" and g.to_json(st) == answer
    old = {k: v for k, v in s.to_dict().items() if k != "order"}
    assert RouteSchema.from_dict(old).order == "value_first" and RouteSchema.from_dict(old).end_id is None
    assert RouteSchema.from_dict(json.loads(json.dumps(s.to_dict()))).end_id == s.end_id


def test_a_schema_of_both_orders_has_two_views_told_apart_by_the_end_of_the_prompt(tokenizer):
    """``both``: one extra token more than key first ([KF]); key first is asked for by ending the prompt
    with it, value first by SEP; each view encodes the same answer in its own order."""
    from distiller.lm.structured import induce_schema
    from router.lm_grammar import Grammar, Request, encode_answer

    rows = extraction.pairs(300, seed=3)
    texts = [r["messages"][-1]["content"] for r in rows]
    answers = [r["answer"] for r in rows]
    both = induce_schema(tokenizer, texts, answers, order="both")
    key_first = induce_schema(tokenizer, texts, answers, order="key_first")
    assert both.views == ["key_first", "value_first"] and key_first.views == ["key_first"]
    assert both.n_extra == key_first.n_extra + 1 and both.key_first_id == both.end_id + 1
    assert both.extra_token_names()[-1] == "<key-first>"
    req = Request.make(tokenizer, texts[0])
    assert both.prompt(req, "key_first")[-1] == both.key_first_id and both.prompt(req, "value_first")[-1] == both.sep_id
    assert key_first.prompt(req)[-1] == key_first.sep_id
    assert encode_answer(both, req, answers[0], "key_first") == encode_answer(key_first, req, answers[0])
    assert both.end_id not in encode_answer(both, req, answers[0], "value_first")[0]
    with pytest.raises(ValueError, match="no 'value_first' view"):
        Grammar(key_first, req, "value_first")
