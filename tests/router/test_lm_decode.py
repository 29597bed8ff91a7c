"""The decoding loop of structured LM students (router/lm_decode.py) keeps inside its budget when the
model never wants to stop.

An undertrained student on a route whose spans may start anywhere (``monotone`` false) and whose
list key may repeat can copy the request over and over. Most of what it writes is then *forced*
(a word's tokens after its first), and forced tokens once did not count against the step budget:
the run grew past its preallocated KV cache and the whole batch failed with ``a decode ran past its
KV cache``. Every token written now counts; such a run ends unfinished (an escalation) and the
runs beside it in the batch are answered.

On the tiny base bench.tiny builds (random weights), with the end of the answer scored out so the
model never chooses it: that is the undertrained student, made certain.
"""

from __future__ import annotations

import json

import pytest

from tests import extraction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", params=["both", "key_first", "value_first"])
def route(tmp_path_factory, request):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.tiny import build_tiny_model
    from distiller.lm.structured import induce_schema
    from router.lm_grammar import RouteSchema
    from router.template import learn_template

    rows = extraction.pairs(300, seed=3)
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-decode"), extraction.corpus(rows), vocab_size=300,
                            hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=1024)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    template = learn_template([r["messages"] for r in rows])
    schema = induce_schema(tokenizer, [template.strip(r["messages"]) for r in rows], [r["answer"] for r in rows],
                           order=request.param)
    assert schema.list_keys == {"city"} and schema.monotone
    # spans may start anywhere again, so the list key can take the same words as often as it likes
    loose = RouteSchema.from_dict({**schema.to_dict(), "monotone": False})
    torch.manual_seed(0)
    extra = torch.randn(loose.n_extra, model.config.hidden_size) * 0.02
    return tokenizer, model, schema, loose, extra


class EndsNever:
    """An engine whose model never picks the end of the answer (it is scored out); the rest is the
    real engine: its forward, its KV cache and its capacity check."""

    def __init__(self, engine, eos_id: int):
        self.engine, self.eos_id = engine, eos_id

    def new_cache(self, capacity: int):
        return self.engine.new_cache(capacity)

    def forward(self, feeds):
        return self.engine.forward(feeds)

    def scores(self, h, ids):
        s = self.engine.scores(h, ids).clone()
        s[[i for i, t in enumerate(ids) if t == self.eos_id]] = -1e9
        return s


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_a_decode_that_never_ends_stops_within_its_budget_and_escalates(route, weights):
    from router.lm_decode import build_engine, decode_batch, max_steps_for
    from router.lm_grammar import Request

    tokenizer, model, monotone, schema, extra = route
    engine = build_engine(model, extra, extra, weights=weights)
    endless = EndsNever(engine, schema.eos_id)
    # long words the tiny tokenizer splits into many pieces: most of each copy is forced
    texts = ["fly from zanzibar quixotically to kuala lumpur flabbergasted",
             "book a flight to rio de janeiro on next friday",
             "rent a cheap car in mexico city tomorrow",
             "hotel in reykjavik for ten nights"]
    requests = [Request.make(tokenizer, t) for t in texts]
    results = decode_batch(endless, schema, requests)  # raised "a decode ran past its KV cache" before
    for req, res in zip(requests, results):
        assert not res.complete  # it never ends: never served, the request escalates
        assert res.completion_tokens <= max_steps_for(schema, req)
        assert sum(d.kind == "cont" for d in res.decisions) < res.completion_tokens  # forced tokens were written
    # where spans follow the request (the route's own schema), the same model runs out of words to
    # copy: the end is forced, and every answer is valid JSON of the route's shape
    for req, res in zip(requests, decode_batch(endless, monotone, requests)):
        assert res.complete and res.completion_tokens <= max_steps_for(monotone, req)
        obj = json.loads(res.text)
        assert json.dumps(obj["intent"]) in monotone.enum_values["intent"] and set(obj) <= set(monotone.keys)
        assert all(v in req.text for k in monotone.copy_keys if k in obj
                   for v in (obj[k] if isinstance(obj[k], list) else [obj[k]]))


def test_packed_float32_layers_decode_exactly_what_plain_ones_do(route, monkeypatch):
    """Where oneDNN runs, the lean decoder's float32 layers are packed once (on an AVX2 CPU a pass of
    2-8 rows cost twice a 1-row pass when every call reordered the weights). Packing changes speed,
    not answers: the same texts, decisions and log-probabilities as plain float32 layers."""
    import router.lm_decode
    from router.lm_decode import build_engine, decode_batch, fp32_packing_available
    from router.lm_grammar import Request

    tokenizer, model, schema, _, extra = route
    if not fp32_packing_available():
        pytest.skip("this PyTorch build has no oneDNN float32 linear")
    packed = build_engine(model, extra, extra, weights="fp32")
    assert packed.packed and packed.weights == "fp32"
    monkeypatch.setattr(router.lm_decode, "fp32_packing_available", lambda: False)
    plain = build_engine(model, extra, extra, weights="fp32")
    assert not plain.packed and plain.weights == "fp32"
    texts = ["fly from boston to denver next monday", "rent a car in paris", "book a hotel in rome for two nights",
             "cheap flights to tokyo on friday", "train from lyon to nice"]
    requests = [Request.make(tokenizer, t) for t in texts]
    for a, b in zip(decode_batch(packed, schema, requests), decode_batch(plain, schema, requests)):
        assert a.text == b.text and a.complete == b.complete and a.passes == b.passes
        assert [d.token for d in a.decisions] == [d.token for d in b.decisions]
        assert a.decisions and all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.decisions, b.decisions))


def test_a_student_of_both_orders_keeps_the_likelier_answer_and_says_whether_they_agreed(route):
    """Each request is decoded in both views in the same passes; the answer kept is the complete one
    whose decisions are likelier, the other's decisions ride along, and agreement is recorded."""
    from router.lm_decode import build_engine, decode_batch
    from router.lm_grammar import Request

    tokenizer, model, schema, _, extra = route
    engine = build_engine(model, extra, extra, weights="fp32")
    texts = ["fly from boston to denver next monday", "rent a car in paris", "book a hotel in rome for two nights"]
    for res in decode_batch(engine, schema, [Request.make(tokenizer, t) for t in texts]):
        assert res.view in schema.views
        if len(schema.views) == 1:  # one order: nothing to combine
            assert res.views_agree is None and not res.alt_decisions
            continue
        assert isinstance(res.views_agree, bool) and res.alt_decisions
        if res.views_agree:
            assert sum(d.logprob for d in res.decisions) >= sum(d.logprob for d in res.alt_decisions)


def test_combine_views_picks_the_likelier_complete_answer():
    from router.lm_decode import Decision, Result, combine_views

    def result(view, obj, lps, complete=True):
        return Result(text=json.dumps(obj), obj=obj, complete=complete, view=view, passes=len(lps),
                      decisions=[Decision("first", 1, lp, 2, 0.1) for lp in lps])

    kf, vf = result("key_first", {"a": "x"}, [-0.1, -0.9]), result("value_first", {"a": "x"}, [-0.2, -0.3, -0.1])
    best = combine_views([kf, vf])
    assert best is vf and best.views_agree is True and best.alt_decisions == kf.decisions and best.passes == 3
    kf, vf = result("key_first", {"a": "x"}, [-0.1]), result("value_first", {"a": "y"}, [-0.01], complete=False)
    best = combine_views([kf, vf])
    assert best is kf and best.views_agree is False  # an unfinished view is never kept over a finished one
    kf, vf = result("key_first", {"a": "x"}, [-0.5]), result("value_first", {"a": "x"}, [-0.5])
    assert combine_views([kf, vf]) is kf  # a tie goes to the first view
    single = result("key_first", {"a": "x"}, [-0.5])
    assert combine_views([single]) is single and single.views_agree is None
