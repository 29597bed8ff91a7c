"""Template learning and stripping, for each template shape a route can have."""

from __future__ import annotations

import random
import time

import pytest

from router.template import MAX_SCRUB_CHARS, PATTERNS, Template, learn_template, scrub_pii

WORDS = ("card", "refund", "late", "transfer", "pin", "blocked", "rate", "fee", "cash", "app", "why", "my",
         "still", "not", "arrived", "help", "account", "money", "euro", "wrong")


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" #{i}" for i in range(n)]


SYSTEM = "You are a triage assistant. " * 40  # a long instruction identical on every call


def test_system_prompt_plus_bare_user_text() -> None:
    texts = _texts(30)
    reqs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in texts]
    tpl = learn_template(reqs)
    assert tpl.slots[0].static == SYSTEM
    assert [tpl.strip(r) for r in reqs] == texts


def test_instruction_wrapped_around_the_text() -> None:
    texts = _texts(30, seed=1)
    wrap = "Classify the sentiment of this review. Answer positive or negative.\n\nReview: {}\n\nAnswer:"
    reqs = [[{"role": "user", "content": wrap.format(t)}] for t in texts]
    tpl = learn_template(reqs)
    assert tpl.slots[0].prefix == "Classify the sentiment of this review. Answer positive or negative.\n\nReview: "
    assert tpl.slots[0].suffix == "\n\nAnswer:"
    assert [tpl.strip(r) for r in reqs] == texts


def test_text_in_the_middle_of_a_template() -> None:
    texts = _texts(40, seed=2)
    reqs = [
        [{"role": "system", "content": "Be terse."},
         {"role": "user", "content": f"Ticket follows.\n---\n{t}\n---\nReturn the queue name. Use lowercase."}]
        for t in texts
    ]
    tpl = learn_template(reqs)
    assert [tpl.strip(r) for r in reqs] == texts


def test_few_shot_examples_as_turns_and_as_a_block() -> None:
    texts = _texts(25, seed=3)
    shots = [
        {"role": "user", "content": "my card never came"},
        {"role": "assistant", "content": "card_arrival"},
        {"role": "user", "content": "what rate do you use"},
        {"role": "assistant", "content": "exchange_rate"},
    ]
    as_turns = [[{"role": "system", "content": "Classify."}, *shots, {"role": "user", "content": t}] for t in texts]
    tpl = learn_template(as_turns)
    assert [tpl.strip(r) for r in as_turns] == texts

    block = "Examples:\nQ: my card never came\nA: card_arrival\nQ: what rate do you use\nA: exchange_rate\n\nQ: "
    as_block = [[{"role": "user", "content": f"{block}{t}\nA:"}] for t in texts]
    tpl = learn_template(as_block)
    assert [tpl.strip(r) for r in as_block] == texts


def test_prefix_never_ends_inside_a_word_and_outliers_do_not_shrink_it() -> None:
    base = ["Text: great film", "Text: grim film", "Text: gritty", "Text: grand", "Text: grey day", "Text: groovy"]
    reqs = [[{"role": "user", "content": t}] for t in base * 3]
    reqs.append([{"role": "user", "content": "something else entirely"}])  # one odd request in 19
    tpl = learn_template(reqs)
    assert tpl.slots[0].prefix == "Text: "
    assert tpl.strip(reqs[0]) == "great film"
    assert tpl.strip(reqs[-1]) == "something else entirely"


def test_too_few_requests_strip_nothing() -> None:
    reqs = [[{"role": "user", "content": "Review: good"}], [{"role": "user", "content": "Review: bad"}]]
    tpl = learn_template(reqs)
    assert tpl.strip(reqs[0]) == "Review: good"


def test_other_shapes_and_serialisation() -> None:
    texts = _texts(20, seed=4)
    reqs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Q: {t}"}] for t in texts]
    tpl = learn_template(reqs)
    again = Template.from_dict(tpl.to_dict())
    assert again.fingerprint() == tpl.fingerprint()
    # a request with an extra turn still loses the system prompt and the "Q: " wrapper
    odd = [{"role": "system", "content": SYSTEM}, {"role": "assistant", "content": "hi"},
           {"role": "user", "content": "Q: where is my card"}]
    assert again.strip(odd) == "hi\nwhere is my card"
    # content as a list of parts
    parts = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": [{"type": "text", "text": "Q: lost pin"}]}]
    assert again.strip(parts) == "lost pin"


def test_scrub_pii() -> None:
    out = scrub_pii("mail a.b@example.com, call +44 20 7946 0958, card 4111 1111 1111 1111, on 2024-03-01")
    assert out == "mail [EMAIL], call [PHONE], card [CARD], on 2024-03-01"


ADVERSARIAL = ["a.", "1", "1 ", "12-", "(12) ", "a@", "a.b@b-", "+1 ", "11111 ", "a@b.", ".@", "a1.-+@ ( )", "@a", "-" * 3 + "1"]


@pytest.mark.parametrize("unit", ADVERSARIAL)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_scrub_pattern_is_linear_on_adversarial_input(name: str, unit: str) -> None:
    """Text built to make a backtracking pattern quadratic (issue 18: the old email pattern took 6.3 s
    on 40 kB of "a."). Measured by growth, not by a clock bound, so a loaded machine cannot fail it:
    10x the text takes ~10x the time for a linear pattern (9-13x measured) and ~100x for a quadratic one."""

    def best_of_3(size: int) -> float:
        text = (unit * (size // len(unit) + 1))[:size]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            PATTERNS[name].sub("X", text)
            times.append(time.perf_counter() - t0)
        return min(times)

    small, large = best_of_3(100_000), best_of_3(1_000_000)
    assert large < 0.01 or large / max(small, 1e-4) < 35, (small, large)


def test_scrubbing_caps_its_input() -> None:
    text = "a." * 2_000_000 + " reach me at x@example.com"
    t0 = time.perf_counter()
    out = scrub_pii(text)
    assert time.perf_counter() - t0 < 2.0  # capped: ~50 ms; uncapped, 4 MB of "a." would take minutes
    assert len(out) <= MAX_SCRUB_CHARS and "example.com" not in out
    assert scrub_pii("write to jane.doe+news@mail.example.co.uk today") == "write to [EMAIL] today"
