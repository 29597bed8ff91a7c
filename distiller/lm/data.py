"""Turn logged chats into training examples: the base model's chat template, loss on the answer only.

Each example is the rendered prompt (system and user turns plus the generation prompt) followed by the
teacher's answer and the template's end-of-turn tokens. Labels are ``-100`` on the prompt, so the
model learns to answer, not to predict the user's words. When the teacher's ``top_logprobs`` line up
token for token with the student's tokenization (the tokenizers match), each answer position also
carries the teacher's top-k distribution for the KL term.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Example", "render_prompt", "build_example", "build_examples", "TokenMap"]

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # teacher targets for the KL term: one entry per label position that has them
    # (position in input_ids of the token being predicted, student token ids, teacher probabilities)
    teacher: list[tuple[int, list[int], list[float]]] = field(default_factory=list)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text a model sees before it answers (chat template with the generation prompt)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


class TokenMap:
    """Maps a token's text (as OpenAI's ``logprobs`` report it) to the student's token id."""

    def __init__(self, tokenizer: Any):
        self.by_text: dict[str, int] = {}
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            # the first id wins: the canonical token for a text is the one BPE prefers (lower id)
            self.by_text.setdefault(text, token_id)

    def get(self, text: str) -> int | None:
        return self.by_text.get(text)


def _teacher_targets(
    completion_ids: list[int],
    offset: int,
    teacher_logprobs: list[dict[str, Any]],
    tokenizer: Any,
    token_map: TokenMap,
) -> list[tuple[int, list[int], list[float]]] | None:
    """Align the teacher's logprob entries with the student's answer tokens, or None if they differ."""
    if len(teacher_logprobs) > len(completion_ids):
        return None
    targets = []
    for i, entry in enumerate(teacher_logprobs):
        if tokenizer.decode([completion_ids[i]]) != entry.get("token"):
            return None  # different tokenizers: the positions do not correspond
        ids, logps = [], []
        for alt in entry.get("top_logprobs") or [{"token": entry["token"], "logprob": entry["logprob"]}]:
            tid = token_map.get(alt["token"])
            if tid is not None and tid not in ids:
                ids.append(tid)
                logps.append(float(alt["logprob"]))
        if not ids:
            return None
        # renormalise the teacher's top-k mass: the KL is taken over the tokens it reported
        m = max(logps)
        weights = [math.exp(lp - m) for lp in logps]
        total = sum(weights)
        targets.append((offset + i - 1, ids, [w / total for w in weights]))
    return targets


def build_example(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    answer: str,
    *,
    max_seq_len: int,
    teacher_logprobs: list[dict[str, Any]] | None = None,
    token_map: TokenMap | None = None,
) -> Example | None:
    """Render one chat and its answer into an Example; None if it does not fit in ``max_seq_len``."""
    prompt_text = render_prompt(tokenizer, messages)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        # Some templates render the last assistant turn differently from the generation prompt;
        # fall back to appending the answer and the end-of-sequence token to the prompt.
        completion_text = answer + (tokenizer.eos_token or "")
    else:
        completion_text = full_text[len(prompt_text) :]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(completion_ids) > max_seq_len:
        return None
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    teacher: list[tuple[int, list[int], list[float]]] = []
    if teacher_logprobs and token_map is not None:
        # logits at position p predict token p+1: the first answer token is predicted at len(prompt)-1
        aligned = _teacher_targets(completion_ids, len(prompt_ids), teacher_logprobs, tokenizer, token_map)
        teacher = aligned or []
    return Example(input_ids=input_ids, labels=labels, teacher=teacher)


def build_examples(
    tokenizer: Any,
    pairs: Sequence[Any],
    *,
    max_seq_len: int,
    use_teacher_logprobs: bool,
) -> tuple[list[Example], dict[str, int]]:
    """Examples for ``pairs`` (ledger ``Pair`` objects) plus counts: kept, too_long, kl_aligned, kl_logged."""
    token_map = None
    if use_teacher_logprobs and any(p.teacher_logprobs for p in pairs):
        token_map = TokenMap(tokenizer)
    out: list[Example] = []
    stats = {"kept": 0, "too_long": 0, "kl_logged": 0, "kl_aligned": 0}
    for pair in pairs:
        ex = build_example(
            tokenizer,
            pair.messages,
            pair.answer,
            max_seq_len=max_seq_len,
            teacher_logprobs=pair.teacher_logprobs if token_map is not None else None,
            token_map=token_map,
        )
        if ex is None:
            stats["too_long"] += 1
            continue
        if pair.teacher_logprobs:
            stats["kl_logged"] += 1
        if ex.teacher:
            stats["kl_aligned"] += 1
        out.append(ex)
        stats["kept"] += 1
    if stats["too_long"]:
        log.warning("%d pairs longer than max_seq_len were skipped", stats["too_long"])
    return out, stats
