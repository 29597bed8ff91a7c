"""The structured student's epoch check: after each epoch the held-back pairs are read in one
teacher-forced pass, and an answer counts as right when every decision's best allowed id is the
teacher's. That must be exactly what greedy decoding gives (checked here against the serving decoder,
pair by pair), and training keeps the weights of the best epoch and stops when the check stops
improving. On the locally built tiny base (fully fine-tuned; the benches measure the real bases)."""

from __future__ import annotations

import json

import pytest

from tests import extraction


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    from transformers import AutoTokenizer

    from bench.tiny import build_tiny_model
    from distiller.lm.structured import build_examples, induce_schema
    from router.template import learn_template

    root = tmp_path_factory.mktemp("lm-epochs")
    rows = extraction.pairs(260, seed=31)
    base = build_tiny_model(root / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=96, layers=2,
                            heads=4, intermediate_size=256)
    template = learn_template([r["messages"] for r in rows[:200]])
    texts = [template.strip(r["messages"]) for r in rows]
    answers = [r["answer"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    # one order: the check reads one view, and greedy decoding of that view is what it must equal (a
    # student of both orders is checked on its first view; what it serves combines the two)
    schema = induce_schema(tokenizer, texts[:200], answers[:200], order="key_first")
    return {"root": root, "base": str(base), "tokenizer": tokenizer, "schema": schema, "template": template,
            "train": build_examples(schema, tokenizer, texts[:200], answers[:200]),
            "val_texts": texts[200:], "val_answers": answers[200:],
            "held_out": build_examples(schema, tokenizer, texts[200:], answers[200:])}


def _student(route, **overrides):
    from distiller.lm.structured import StructuredConfig, TrainableStudent

    cfg = StructuredConfig(base_model=route["base"], method="full", learning_rate=3e-3, extra_learning_rate=1e-2,
                           progress=False, vllm_export=False, time_budget_s=0, **overrides)
    return TrainableStudent(route["base"], route["schema"], route["tokenizer"], cfg, "cpu"), cfg


def test_the_teacher_forced_check_is_what_greedy_decoding_answers(route, tmp_path):
    from distiller.lm.structured import train, write_weights
    from router.agreement import answers_agree
    from router.lm_structured import load_structured_model

    student, cfg = _student(route, epochs=3, select_epoch=False)
    train(student, route["train"], cfg)  # undertrained: some answers right, some wrong
    assert len(route["held_out"]) == len(route["val_texts"])  # the grammar expresses every fixture answer
    right, loss = student.held_out_check(route["held_out"], batch_size=7)
    assert loss > 0
    write_weights(student, route["tokenizer"], tmp_path)
    manifest = {"base_model": route["base"], "weights": "full", "template": route["template"].to_dict(),
                "decoding": {"max_draft": 4, "weights": "fp32", "max_input_tokens": 512}}
    model = load_structured_model(tmp_path, manifest, device="cpu")
    decoded = [r.complete and answers_agree("json", r.text, a)
               for r, a in zip(model.decode(route["val_texts"]), route["val_answers"])]
    assert 0 < sum(right) < len(right), right  # both kinds of answer are compared
    assert right == decoded


def _scripted(monkeypatch, checks):
    """Make the epoch checks answer ``checks`` ((exact share, loss) per epoch) after running the real
    pass; returns the trainable weights as each check saw them."""
    from distiller.lm.structured import TrainableStudent

    scripted, snapshots = iter(checks), []
    real = TrainableStudent.held_out_check

    def check(self, examples, *, batch_size=16):
        real(self, examples, batch_size=batch_size)
        assert self.model.training  # the check leaves the model training
        snapshots.append([p.detach().clone() for group in self.parameters() for p in group])
        share, loss = next(scripted)
        return [i < round(share * len(examples)) for i in range(len(examples))], loss

    monkeypatch.setattr(TrainableStudent, "held_out_check", check)
    return snapshots


def test_training_keeps_the_best_epochs_weights_and_stops_when_the_check_stops_improving(route, monkeypatch):
    from distiller.lm.structured import train

    student, cfg = _student(route, epochs=8, select_epoch=True, patience=2, batch_size=20)
    n = len(route["held_out"])
    # epoch 2 is the best; epochs 3 and 4 beat neither its agreement nor the lowest loss (epoch 2's)
    snapshots = _scripted(monkeypatch, [(0.3, 0.9), (0.6, 0.5), (0.5, 0.6), (0.55, 0.7), (0.9, 0.1)])
    stats = train(student, route["train"], cfg, held_out=route["held_out"], held_out_pairs=n)
    per_epoch = 10  # 200 examples in batches of 20
    assert [c["step"] for c in stats["epoch_checks"]] == [10, 20, 30, 40]
    assert [c["exact"] for c in stats["epoch_checks"]] == [0.3, 0.6, 0.5, 0.55]
    assert stats["stopped_early"] and stats["steps"] == 4 * per_epoch and stats["kept_step"] == 2 * per_epoch
    now = [p.detach() for group in student.parameters() for p in group]
    assert all((a == b).all() for a, b in zip(now, snapshots[1]))  # epoch 2's weights are back
    assert not all((a == b).all() for a, b in zip(now, snapshots[3]))


def test_a_plateau_with_a_falling_loss_goes_on_and_a_tie_keeps_the_lower_loss(route, monkeypatch):
    from distiller.lm.structured import train

    student, cfg = _student(route, epochs=5, select_epoch=True, patience=2, batch_size=20)
    # no gain in agreement for four epochs, but the loss falls: a slow start, not memorising
    _scripted(monkeypatch, [(0.0, 2.0), (0.0, 1.5), (0.0, 1.2), (0.4, 1.4), (0.4, 1.3)])
    stats = train(student, route["train"], cfg, held_out=route["held_out"], held_out_pairs=len(route["held_out"]))
    assert not stats["stopped_early"] and stats["steps"] == 50 and len(stats["epoch_checks"]) == 5
    assert stats["kept_step"] == 50  # tied at 0.4 with epoch 4, at a lower loss


def test_a_pair_the_grammar_cannot_express_counts_against_the_check(route):
    from distiller.lm.structured import train

    student, cfg = _student(route, epochs=1, select_epoch=True)
    stats = train(student, route["train"], cfg, held_out=route["held_out"][:10], held_out_pairs=20)
    assert stats["epoch_checks"][-1]["held_out_loss"] > 0
    check = stats["epoch_checks"][-1]
    assert check["exact"] <= 0.5 and stats["kept_step"] == stats["steps"]


def test_an_lm_curve_point_reports_its_epoch_checks(route, tmp_path):
    """The bench's table says which epoch's weights were kept when it was not the last."""
    from bench.lm_curve import format_table

    point = {"n": 200, "kind": "lm_structured", "exact_agreement": 0.5, "coverage": {"0.95": 0.1},
             "served_at_val_threshold": {"0.95": {"coverage": 0.1, "agreement": 0.9}}, "train_seconds": 10.0,
             "train_epochs": 4.0, "kept_step": 20, "p50_ms": 5.0, "p95_ms": 9.0,
             "epoch_checks": [{"epoch": 1.0, "step": 10}, {"epoch": 2.0, "step": 20}, {"epoch": 4.0, "step": 40}]}
    doc = {"base_model": "tiny", "dataset": {"train": "a", "test": "b"}, "test_pairs": 10, "threads": 1,
           "targets": [0.95], "points": [point]}
    assert "| 4 (kept 2) |" in format_table(doc)
    point["kept_step"] = 40
    assert "| 4 |" in format_table(json.loads(json.dumps(doc)))


def test_the_time_budget_reserves_the_epoch_checks_still_to_come():
    """The plan made at step 10 knows a step's cost but not a check's; after the first check the schedule
    is shortened to what fits with one check at every epoch's end and one at the last step."""
    from distiller.lm.structured import _steps_that_fit

    # 100 steps an epoch, 2 s a step, 40 s a check, at step 100 with 1,000 s left: 400 steps (800 s) and
    # the checks at 200, 300, 400 and 500 (160 s) fit; one step more would need a fifth check
    assert _steps_that_fit(1000, 100, 800, per_step=2, per_check=40, per_epoch=100) == 500
    assert _steps_that_fit(1001, 100, 800, per_step=2, per_check=40, per_epoch=100) == 500
    # ending mid-epoch costs a check too: 350 steps (700 s) and the checks at 200, 300, 400, 450
    assert _steps_that_fit(860, 100, 800, per_step=2, per_check=40, per_epoch=100) == 450
    assert _steps_that_fit(10**6, 100, 800, per_step=2, per_check=40, per_epoch=100) == 800  # never lengthened
    assert _steps_that_fit(1, 100, 800, per_step=2, per_check=40, per_epoch=100) == 100  # nothing fits: stop here


def test_a_route_trained_with_the_epoch_check_records_it_and_its_check_is_the_decoded_validation(tmp_path):
    """Through the LM distiller (``lm_settings.structured.select_epoch``): the artifact's metrics carry
    every epoch's check, and the check of the kept epoch equals the exact agreement the serving decoder
    then measures on the same validation pairs."""
    from bench.tiny import build_tiny_model
    from distiller.lm.config import LMTrainConfig
    from distiller.lm.train import distill_lm_route
    from store import Ledger
    from tests.distiller.conftest import seed_exchanges

    rows = extraction.pairs(200, seed=41)
    base = build_tiny_model(tmp_path / "tiny", extraction.corpus(rows), vocab_size=600, hidden_size=96, layers=2,
                            heads=4, intermediate_size=256)
    config = LMTrainConfig.from_dict({
        "base_model": str(base), "method": "full", "progress": False, "target_agreement": 0.9,
        "structured": {"epochs": 4, "learning_rate": 3e-3, "extra_learning_rate": 1e-2, "vllm_export": False,
                       "select_epoch": True, "patience": 3},
    })
    ledger = Ledger(tmp_path / "l.db")
    seed_exchanges(ledger, "travel", rows)
    out = distill_lm_route(tmp_path / "l.db", "travel", config, artifacts_dir=tmp_path / "artifacts")
    ledger.close()
    metrics = out["metrics"]
    checks = metrics["epoch_checks"]
    assert [c["epoch"] for c in checks] == [1.0, 2.0, 3.0, 4.0] and not metrics["stopped_early"]
    kept = next(c for c in checks if c["step"] == metrics["kept_step"])
    assert kept["exact"] == max(c["exact"] for c in checks)
    assert 0.0 < kept["exact"] < 1.0 and metrics["val_pairs"] == 40  # some validation answers wrong
    assert metrics["exact_agreement"] == pytest.approx(kept["exact"], abs=1e-4)


def test_the_time_budget_plan_follows_the_pace_so_far_and_lengthens_again():
    """A plan made on the first 10 steps alone undershot: they ran ~1.5x slower than the rest, and a
    SNIPS run was cut to 476 of 500 steps that then took 1,212 of its 1,800 s. The plan is made again
    every REPLAN_EVERY steps from the mean pace so far, and comes back up when the pace does."""
    from distiller.lm.structured import REPLAN_EVERY, budget_plan

    assert REPLAN_EVERY <= 100
    # step 10 after 40 s (4 s a step): 1,760 s left fit 440 more steps
    assert budget_plan(1800, 40, 0, 0, 10, 500, 100) == 450
    # step 200 after 500 s (2.5 s a step): 1,300 s fit the 300 steps still planned, the plan comes back
    assert budget_plan(1800, 500, 0, 0, 200, 500, 100) == 500
    # with two checks of 50 s each in those 500 s: 2 s a step, 50 s a check; 1,300 s left fit 500 steps'
    # training but the checks at 300, 400 and 500 too: (500 - 200) * 2 + 3 * 50 = 750 s, all of it
    assert budget_plan(1800, 500, 100, 2, 200, 500, 100) == 500
    # a slow pace: 6 s a step at step 100 (600 s) leaves 1,200 s, 200 more steps
    assert budget_plan(1800, 600, 0, 0, 100, 500, 100) == 300
    assert budget_plan(1800, 1900, 0, 0, 100, 500, 100) == 100  # past the budget: nothing more fits
