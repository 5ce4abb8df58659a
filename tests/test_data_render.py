"""Rendering contracts: layout, labels, budgets, prompt/answer split, collation."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gistlib.data import (
    COMPACT,
    IGNORE,
    VERBOSE,
    Episode,
    Example,
    answer_ids,
    choice_ids,
    collate,
    render_downstream,
    render_downstream_prompt,
    render_gisting,
    render_gisting_prompt,
    render_hyper_input,
    render_icl,
    render_icl_prompt,
)
from gistlib.models.tiny import build_tokenizer, gist_token_ids

CORPUS = [
    "\nInput:\nthe cat sat on the mat\nOutput:\npositive\n",
    "Definition:\nClassify the sentiment of a sentence.\n",
    "a dog ran in the park -> negative ; some words here",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer(CORPUS, num_gist_tokens=4, kind="bpe", vocab_size=400)


@pytest.fixture(scope="module")
def word():
    return build_tokenizer(CORPUS, num_gist_tokens=4, kind="word")


def episode(n_demos=3, definition="Classify the sentiment of a sentence."):
    demos = [Example(f"the cat sat {i}", "positive") for i in range(n_demos)]
    return Episode("toy", demos, [Example("a dog ran", "negative", ["positive", "negative"])], definition)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_downstream_layout_and_labels(bpe):
    q = Example("a dog ran", "negative")
    ids, labels = render_downstream(q, bpe, VERBOSE, 64)
    expected = (
        [bpe.bos_token_id] + enc(bpe, "\nInput:\na dog ran\nOutput:\n") + enc(bpe, "negative") + [bpe.eos_token_id]
    )
    assert ids == expected
    n_answer = len(enc(bpe, "negative")) + 1
    assert labels[:-n_answer] == [IGNORE] * (len(ids) - n_answer)
    assert labels[-n_answer:] == ids[-n_answer:]
    assert bpe.decode(ids, skip_special_tokens=True) == "\nInput:\na dog ran\nOutput:\nnegative"


def test_hyper_input_layout(bpe):
    g = gist_token_ids(bpe)
    ep = episode()
    ids = render_hyper_input(ep, bpe, g, VERBOSE, 512)
    text = (
        "Definition:\n" + ep.definition + "\n" + "".join(f"\nInput:\n{d.input}\nOutput:\n{d.output}" for d in ep.demos)
    )
    assert ids[0] == bpe.bos_token_id and ids[-4:] == g
    assert bpe.decode(ids[1:-4]) == text
    assert bpe.eos_token_id not in ids


def test_gisting_and_icl_share_the_query_part(bpe):
    g = gist_token_ids(bpe)
    ep = episode()
    q = ep.queries[0]
    gi, gl = render_gisting(ep, q, bpe, g, VERBOSE, 512)
    ii, il = render_icl(ep, q, bpe, VERBOSE, 512)
    di, dl = render_downstream(q, bpe, VERBOSE, 512)
    hyper = render_hyper_input(ep, bpe, g, VERBOSE, 512)
    # gisting = hyper input + downstream without BOS; ICL = gisting without the gists
    assert gi == hyper + di[1:] and gl == [IGNORE] * len(hyper) + dl[1:]
    assert ii == hyper[:-4] + di[1:] and il == [IGNORE] * (len(hyper) - 4) + dl[1:]


@pytest.mark.parametrize("fmt", [VERBOSE, COMPACT])
def test_prompt_plus_answer_is_the_full_sequence(bpe, fmt):
    g = gist_token_ids(bpe)
    ep = episode()
    q = ep.queries[0]
    a = answer_ids(q.output, bpe, fmt)
    assert render_downstream_prompt(q, bpe, fmt, 512) + a == render_downstream(q, bpe, fmt, 512)[0]
    assert render_icl_prompt(ep, q, bpe, fmt, 512) + a == render_icl(ep, q, bpe, fmt, 512)[0]
    assert render_gisting_prompt(ep, q, bpe, g, fmt, 512) + a == render_gisting(ep, q, bpe, g, fmt, 512)[0]
    assert choice_ids(q, bpe, fmt)[1] == a  # 'negative' is choice 1


def test_compact_format_with_word_tokenizer(word):
    ep = Episode("t", [Example("cat", "positive"), Example("dog", "negative")], [Example("mat", "positive")])
    ids, labels = render_icl(ep, ep.queries[0], word, COMPACT, 32)
    toks = word.convert_ids_to_tokens(ids)
    assert toks == ["<s>", "cat", "positive", ";", "dog", "negative", ";", "mat", "->", "positive", "</s>"]
    assert [t for t, lab in zip(toks, labels) if lab != IGNORE] == ["positive", "</s>"]


def test_budget_drops_whole_demos_in_order(bpe):
    g = gist_token_ids(bpe)
    ep = episode(n_demos=6)
    full = render_hyper_input(ep, bpe, g, VERBOSE, 10_000)
    demo_len = len(enc(bpe, "\nInput:\nthe cat sat 0\nOutput:\npositive"))
    budget = len(full) - demo_len  # room for exactly one demo less
    ids = render_hyper_input(ep, bpe, g, VERBOSE, budget)
    assert len(ids) <= budget and ids[-4:] == g
    trimmed = Episode("toy", ep.demos[:5], ep.queries, ep.definition)
    assert ids == render_hyper_input(trimmed, bpe, g, VERBOSE, 10_000)


def test_query_that_cannot_fit_names_the_task(bpe):
    g = gist_token_ids(bpe)
    ep = episode()
    with pytest.raises(ValueError, match="toy"):
        render_gisting(ep, Example("word " * 200, "negative"), bpe, g, VERBOSE, 64)
    with pytest.raises(ValueError, match="toy"):  # not even the first demo fits
        render_hyper_input(episode(definition=None), bpe, g, VERBOSE, 6)


@settings(max_examples=30, deadline=None)
@given(n_demos=st.integers(0, 8), budget=st.integers(30, 200), seed=st.integers(0, 10**6))
def test_budget_property(bpe, n_demos, budget, seed):
    """Under any budget: length fits, gists and answer are intact, and the demos kept are exactly those a greedy
    pass in order keeps (one that would overflow is left out, later ones that fit are kept)."""
    rng = random.Random(seed)
    demos = [
        Example(" ".join(rng.choice(["cat", "dog", "sat"]) for _ in range(rng.randint(1, 6))), "positive")
        for _ in range(n_demos)
    ]
    ep = Episode("prop", demos, [Example("a dog", "negative")], None)
    g = gist_token_ids(bpe)
    tail = enc(bpe, "\nInput:\na dog\nOutput:\n") + enc(bpe, "negative") + [bpe.eos_token_id]
    demo_rows = [enc(bpe, f"\nInput:\n{d.input}\nOutput:\n{d.output}") for d in demos]
    room, expected = budget - 1 - len(g) - len(tail), []  # BOS, gists, query + answer are never cut
    for row in demo_rows:  # the reference: a brute-force greedy pass
        if sum(map(len, expected)) + len(row) <= room:
            expected.append(row)
    try:
        ids, _ = render_gisting(ep, ep.queries[0], bpe, g, VERBOSE, budget)
    except ValueError as e:
        assert "prop" in str(e) and demos and not expected
        return
    assert len(ids) <= budget
    assert ids[-len(tail) - len(g) :] == g + tail
    assert ids[1 : -len(tail) - len(g)] == [t for row in expected for t in row]


def test_collate_right_and_left(bpe):
    rows = [([1, 5, 6], [IGNORE, 5, 6]), ([1, 7], [IGNORE, 7])]
    r = collate(rows, pad_id=0)
    assert r["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert r["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert r["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]
    left = collate(rows, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert left["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, IGNORE, 7]]
    plain = collate([[1, 2], [3]], pad_id=9)
    assert plain["labels"].tolist() == [[1, 2], [3, IGNORE]] and plain["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        collate([([1, 2], [1])], pad_id=0)
