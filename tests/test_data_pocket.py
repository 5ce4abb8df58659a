"""The pocket suite in data/pocket: reproducible bytes, disjoint rules, chance-level zero-shot, levels, vocab."""

import filecmp
import json
from collections import Counter, defaultdict

import pytest

from gistlib.data import (
    COMPACT,
    EpisodeSampler,
    load_pocket_suite,
    pocket_tokenizer,
    render_icl,
    write_pocket_suite,
)
from gistlib.data.pocket import DEFAULT_DIR, SPLITS, apply_transform, pocket_words_by_id
from gistlib.models.tiny import gist_token_ids


@pytest.fixture(scope="module")
def suite():
    if not (DEFAULT_DIR / "train.jsonl").exists():
        pytest.fail("data/pocket is missing: run `python -m gistlib.data.pocket`")
    return load_pocket_suite()


def test_regenerating_reproduces_the_files_byte_for_byte(tmp_path):
    write_pocket_suite(tmp_path)
    names = sorted(p.name for p in DEFAULT_DIR.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    _match, mismatch, errors = filecmp.cmpfiles(DEFAULT_DIR, tmp_path, names, shallow=False)
    assert mismatch == [] and errors == []


def test_sizes_families_levels(suite):
    assert len(suite["train"]) >= 3000 and len(suite["test"]) >= 300 and len(suite["validation"]) >= 100
    for split in SPLITS:
        levels = Counter((t.family, t.meta["level"]) for t in suite[split])
        assert {f for f, _ in levels} == {"classify", "transform", "arith"}
        assert {lv for f, lv in levels if f == "classify"} == {"C2", "C4", "C8"}
    c4 = [t for t in suite["train"] if t.meta["level"] == "C4"]
    assert len(c4) == 3000 and all(len(t.examples) == 24 and t.meta["num_demos"] == 8 for t in c4)
    total = sum(p.stat().st_size for p in DEFAULT_DIR.iterdir())
    assert total < 10_000_000


def test_rules_are_disjoint_across_splits(suite):
    rules = {s: {(t.family, t.meta["rule"]) for t in suite[s]} for s in SPLITS}
    assert not rules["train"] & rules["test"]
    assert not rules["train"] & rules["validation"] and not rules["validation"] & rules["test"]
    # no two tasks share a rule, even within a split
    assert sum(len(suite[s]) for s in SPLITS) == sum(len(r) for r in rules.values())
    # functional check: no training transform agrees with a held-out one on its inputs
    train_rules = [tuple(t.meta["rule"].split(",")) for t in suite["train"] if t.family == "transform"]
    for t in suite["test"]:
        if t.family != "transform":
            continue
        xs = [e.input.split() for e in t.examples[:8]]
        assert all(
            apply_transform(tuple(t.meta["rule"].split(",")), x) == e.output.split() for x, e in zip(xs, t.examples)
        )
        for r in train_rules:
            assert any(apply_transform(r, x) != e.output.split() for x, e in zip(xs, t.examples)), (t.name, r)


def test_classification_tasks_are_injective_maps_with_choices(suite):
    for t in suite["test"][:200]:
        if t.family != "classify":
            continue
        C = t.meta["num_categories"]
        assert all(e.choices == t.examples[0].choices and len(e.choices) == C for e in t.examples)
        assert (
            len({e.output for e in t.examples}) == C and Counter(e.output for e in t.examples).most_common(1)[0][1] == 6
        )
        assert all(e.output in e.choices for e in t.examples)


def test_zero_shot_is_at_chance(suite):
    """The best demo-free predictor (most frequent training output for the same input) scores at chance
    on held-out tasks."""
    majority: dict = defaultdict(Counter)
    for t in suite["train"]:
        for e in t.examples:
            majority[(t.family, e.input)][e.output] += 1
    hits, n = Counter(), Counter()
    for t in suite["test"]:
        for e in t.examples:
            guess = majority[(t.family, e.input)].most_common(1)
            hits[t.family] += bool(guess) and guess[0][0] == e.output
            n[t.family] += 1
    assert hits["classify"] / n["classify"] < 0.12  # chance over 16 symbols: 0.0625
    assert hits["transform"] / n["transform"] < 0.05
    assert hits["arith"] / n["arith"] < 0.05


def test_tokenizer_covers_the_suite_and_is_deterministic(suite):
    tok = pocket_tokenizer(num_gist_tokens=8)
    assert len(tok) < 300 and len(gist_token_ids(tok)) == 8
    words = [json.loads(line) for line in (DEFAULT_DIR / "vocab.txt").read_text().splitlines()]
    assert words == pocket_words_by_id()
    vocab = tok.get_vocab()
    assert [w for w in sorted(vocab, key=vocab.get) if w not in tok.all_special_tokens] == words
    for split in SPLITS:
        for ep in EpisodeSampler(suite[split], None, 2, seed=0).take(100):
            ids, _ = render_icl(ep, ep.queries[0], tok, COMPACT, 512)
            assert tok.unk_token_id not in ids


def test_corpus_documents_each_come_from_one_training_task(suite):
    from gistlib.data import load_pocket_corpus

    docs = load_pocket_corpus()
    assert len(docs) == 2000
    owners: dict = defaultdict(set)  # (input, output) -> training tasks that contain it
    for i, t in enumerate(suite["train"]):
        for e in t.examples:
            owners[(e.input, e.output)].add(i)
    for doc in docs[:300]:
        common = None
        for segment in doc.strip(" ;").split(" ; "):
            toks = segment.split()
            half = len(toks) // 2
            pair = (" ".join(toks[:half]), " ".join(toks[half:]))
            common = owners[pair] if common is None else common & owners[pair]
        assert common, doc
