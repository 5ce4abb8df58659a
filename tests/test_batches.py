"""Batch streams: shapes, labels where they belong, reproducibility, dense ICL labels."""

import torch

from gistlib.data import COMPACT, Episode, Example, load_pocket_suite, pocket_tokenizer, render_icl
from gistlib.data.batches import (
    gisting_batches,
    hyper_batches,
    hyperpretrain_batches,
    icl_batches,
    render_icl_dense,
    sample_episodes,
)
from gistlib.models.tiny import gist_token_ids

TOK = pocket_tokenizer(4)
GIST = gist_token_ids(TOK)


def tasks():
    return [t for t in load_pocket_suite()["train"] if t.meta.get("level") == "C4"][:50]


def test_icl_and_gisting_batches_label_only_answers():
    b = next(icl_batches(sample_episodes(tasks(), 1, 1), TOK, 4))
    assert b["input_ids"].shape == b["labels"].shape and b["input_ids"].shape[0] == 4
    assert ((b["labels"] != -100).sum(1) == 2).all()  # the symbol and EOS
    g = next(gisting_batches(sample_episodes(tasks(), 1, 1), TOK, GIST, 4))
    assert all(set(GIST) <= set(row.tolist()) for row in g["input_ids"])


def test_streams_are_reproducible():
    a = next(hyper_batches(sample_episodes(tasks(), 7, 2), TOK, GIST, 3))
    b = next(hyper_batches(sample_episodes(tasks(), 7, 2), TOK, GIST, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["task_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert (a["hyper_input_ids"][:, -len(GIST) :] == torch.tensor(GIST)).all()  # left padded: gists last


def test_dense_labels_cover_every_demo_output():
    ep = Episode("t", [Example("fama", "GO"), Example("muso", "DA")], [Example("lufu", "GO")])
    ids, labels = render_icl_dense(ep, ep.queries[0], TOK, COMPACT, 64)
    plain_ids, plain_labels = render_icl(ep, ep.queries[0], TOK, COMPACT, 64)
    assert ids == plain_ids
    labelled = [TOK.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != -100]
    assert labelled == ["GO", "DA", "GO", "</s>"]
    assert [lab for lab in plain_labels if lab != -100] == labels[-2:]


def test_hyperpretrain_segments_continue_the_context():
    docs = ["a b c d e f g h i j k l m n o p".replace(" ", " ")] * 3
    from gistlib.models.tiny import build_tokenizer

    tok = build_tokenizer(docs, 2, kind="word")
    b = next(hyperpretrain_batches(docs, tok, gist_token_ids(tok), 2, context_tokens=5, continuation_tokens=3))
    for h, d in zip(b["hyper_input_ids"], b["input_ids"]):
        ctx = tok.convert_ids_to_tokens(h[1:6].tolist())
        cont = tok.convert_ids_to_tokens(d[1:4].tolist())
        letters = "abcdefghijklmnop"
        assert letters.index(cont[0]) == letters.index(ctx[-1]) + 1
