"""The student's feature code: fast paths must equal the libraries they stand in for."""

from __future__ import annotations

import os

import numpy as np
import pytest

from router.lexical import EmptyVocabulary, LexicalFeatures

TEXTS = [
    "I still have not received my new card, can you check?",
    "Top-up by cheque: how long does it take?",
    "card card card arrival ARRIVAL",
    "Why was I charged an extra fee on my card payment?",
    "where is my card",
    "",
    "émoji 🙂 und Umlaute: Überweisung nicht angekommen",
]


def test_lexical_transform_equals_scikit_learn_and_survives_saving() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = TEXTS * 2 + ["a unique bigram here"]
    lex = LexicalFeatures.fit(corpus, min_df=2)
    sk = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=50000).fit(corpus)
    assert lex.vocabulary == sk.vocabulary_
    ours = lex.transform(TEXTS + ["never seen words only"]).toarray()
    theirs = sk.transform(TEXTS + ["never seen words only"]).toarray()
    assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=1e-6)
    assert not ours[-1].any() and not ours[5].any()  # nothing known: an empty row, not NaN
    back = LexicalFeatures.from_saved(lex.to_dict(), lex.idf)
    assert np.allclose(back.transform(TEXTS).toarray(), ours[: len(TEXTS)], atol=1e-6)
    with pytest.raises(EmptyVocabulary):
        LexicalFeatures.fit(["a b", "c d"], min_df=2)  # no word of two letters occurs twice


def test_one_text_fast_path_equals_the_batch_encoder() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from router.embedding import get_embedder

    embedder = get_embedder("all-MiniLM-L6-v2")
    batch = embedder.encode(TEXTS[:4] + TEXTS[6:])
    assert embedder._plain_mean_pooling()
    one = np.concatenate([embedder.encode([t]) for t in TEXTS[:4] + TEXTS[6:]])
    assert one.dtype == np.float32 and np.allclose(one, batch, atol=1e-5)


def test_serving_process_turns_onednn_off_and_embeds_the_same() -> None:
    """The gateway's startup (prepare_serving_process) switches oneDNN off for the student path's
    memory; the embeddings must not change. In a child process: the flag is global to torch."""
    import json
    import subprocess
    import sys

    code = f"""
import json, os, numpy as np, torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from router.embedding import get_embedder, prepare_serving_process
texts = json.loads({json.dumps(json.dumps(TEXTS))})
emb = get_embedder("all-MiniLM-L6-v2")
assert torch.backends.mkldnn.enabled
on = emb.encode(texts)
prepare_serving_process()
assert torch.backends.mkldnn.enabled is False
off = emb.encode(texts)
print(json.dumps(float(np.abs(on - off).max())))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) < 1e-5
