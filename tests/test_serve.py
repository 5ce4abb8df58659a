"""Prefix store and multi-task serving: batched = one at a time, disk round trip, clear errors."""

import pytest
import torch
from conftest import GIST_IDS, PAD, VOCAB

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.prefix import Prefix, forward_with_prefix, generate_with_prefix
from gistlib.core.scoring import sequence_logprobs
from gistlib.models.tiny import build_tiny_llama
from gistlib.serve import PrefixStore, UnknownTaskError, read_store_metadata

TOL = 1e-5
NAMES = [f"task_{i}" for i in range(5)]


def hyper_inputs(seed=0):
    """`[BOS] demos G_1..G_k` of five tasks with different demo lengths."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 56, (n,), generator=g).tolist() + GIST_IDS for n in (3, 9, 14, 6, 11)]


def queries(seed=1):
    """Seven queries over the five tasks, mixed order, prompts and choices of different lengths."""
    g = torch.Generator().manual_seed(seed)
    tasks = ["task_3", "task_0", "task_3", "task_1", "task_4", "task_2", "task_0"]
    prompts = [[1] + torch.randint(3, 56, (n,), generator=g).tolist() for n in (2, 5, 3, 7, 4, 2, 6)]
    choices = [
        [torch.randint(3, 56, (m,), generator=g).tolist() + [2] for m in ms]
        for ms in ([1, 2], [1, 1, 1], [3, 1], [2, 2, 4], [1], [2, 3], [1, 1])
    ]
    return tasks, prompts, choices


def make_hyper():
    hyper = HyperLlama(build_tiny_llama(vocab_size=VOCAB, seed=0), GIST_IDS, HyperConfig(num_gist_tokens=len(GIST_IDS)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero LoRA: the hypernetwork differs from the downstream model
        for n, p in hyper.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return hyper.eval()


@pytest.fixture(scope="module", params=["hyper", "gist_model"])
def served(request):
    """(store with five tasks, reference scorer, reference generator) for each way of making prefixes."""
    if request.param == "hyper":
        hyper = make_hyper()
        store = PrefixStore.from_hyper(hyper, pad_token_id=PAD)

        def score_one(prefix, ids, labels):
            return hyper.score(prefix, ids, torch.ones_like(ids), labels)[0]

        def generate_one(prefix, ids, n):
            return hyper.generate(prefix, ids, torch.ones_like(ids), n, pad_token_id=PAD)
    else:
        model = build_tiny_llama(vocab_size=VOCAB, seed=0)
        store = PrefixStore.from_gist_model(model, GIST_IDS, pad_token_id=PAD)

        def score_one(prefix, ids, labels):
            return sequence_logprobs(forward_with_prefix(model, prefix, ids, torch.ones_like(ids)).logits, labels)[0]

        def generate_one(prefix, ids, n):
            return generate_with_prefix(model, prefix, ids, torch.ones_like(ids), n, pad_token_id=PAD)

    store.add(NAMES, hyper_inputs(), batch_size=3)  # two batches with padding
    return store, score_one, generate_one


def test_batched_prefixes_equal_one_at_a_time(served):
    store, *_ = served
    batched = store.get(NAMES)
    for i, ids in enumerate(hyper_inputs()):
        single = store.make_prefix(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(batched.rows([i]).keys, single.keys, atol=TOL, rtol=0)
        torch.testing.assert_close(batched.rows([i]).values, single.values, atol=TOL, rtol=0)


def test_multitask_scores_equal_one_at_a_time(served):
    store, score_one, _ = served
    tasks, prompts, choices = queries()
    batched = store.score_choices(tasks, prompts, choices, batch_size=64)  # every (query, choice) in one forward
    chunked = store.score_choices(tasks, prompts, choices, batch_size=4)
    assert [s.shape for s in batched] == [(len(c),) for c in choices]
    for q, (task, prompt) in enumerate(zip(tasks, prompts)):
        for c, choice in enumerate(choices[q]):
            ids = torch.tensor([prompt + choice])
            labels = torch.tensor([[-100] * len(prompt) + choice])
            expected = score_one(store.get(task), ids, labels)[0]
            assert abs(batched[q][c].item() - expected.item()) < TOL, (q, c)
            assert abs(chunked[q][c].item() - expected.item()) < TOL, (q, c)


def test_multitask_generation_equals_one_at_a_time(served):
    store, _, generate_one = served
    tasks, prompts, _ = queries()
    batched = store.generate(tasks, prompts, max_new_tokens=6)
    assert batched == store.generate(tasks, prompts, max_new_tokens=6, batch_size=3)
    for task, prompt, got in zip(tasks, prompts, batched):
        assert got == generate_one(store.get(task), torch.tensor([prompt]), 6)[0]
    # prefixes matter: the same prompt under two different tasks' prefixes gives different answers
    two = store.generate(["task_0", "task_1"], [prompts[0], prompts[0]], max_new_tokens=6)
    assert two[0] != two[1]


def test_save_load_round_trip(served, tmp_path):
    store, *_ = served
    path = store.save(tmp_path / "store" / "prefixes.safetensors", meta={"checkpoint": "tiny"})
    assert [p.name for p in path.parent.iterdir()] == ["prefixes.safetensors"]  # no temporary file left
    info = read_store_metadata(path)
    assert (
        info["tasks"] == NAMES
        and info["num_virtual_tokens"] == len(GIST_IDS)
        and info["meta"] == {"checkpoint": "tiny"}
    )
    loaded = PrefixStore(store.model, downstream=store.downstream, pad_token_id=PAD)
    assert loaded.load(path)["tasks"] == NAMES
    assert loaded.names == store.names and loaded.nbytes() == store.nbytes()
    a, b = store.get(NAMES), loaded.get(NAMES)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    tasks, prompts, choices = queries()
    for x, y in zip(store.score_choices(tasks, prompts, choices), loaded.score_choices(tasks, prompts, choices)):
        assert torch.equal(x, y)
    # a file written for another model shape is refused
    other = PrefixStore(build_tiny_llama(vocab_size=VOCAB, num_layers=3))
    with pytest.raises(ValueError, match="do not fit this model"):
        other.load(path)


def test_put_replaces_and_checks_shapes(served):
    store, *_ = served
    fresh = PrefixStore(store.model)
    p = store.get(["task_0", "task_1"])
    fresh.put(["a", "b"], p)
    fresh.put("a", store.get("task_2"))  # replace in place
    assert fresh.names == ["a", "b"] and len(fresh) == 2 and "a" in fresh
    assert torch.equal(fresh.get("a").keys, store.get("task_2").keys)
    assert fresh.nbytes() == p.nbytes()
    bad = Prefix(p.keys[..., :2, :], p.values[..., :2, :])  # k = 2 instead of 4
    with pytest.raises(ValueError, match="does not match the store"):
        fresh.put(["c", "d"], bad)


def test_unknown_task_is_a_clear_error(served):
    store, *_ = served
    tasks, prompts, choices = queries()
    with pytest.raises(UnknownTaskError, match=r"unknown task 'task_9'.*did you mean 'task_\d'"):
        store.score_choices(tasks[:1] + ["task_9"], prompts[:2], choices[:2])
    with pytest.raises(KeyError, match="unknown task 'nope'"):  # it is a KeyError too
        store.generate(["nope"], prompts[:1], max_new_tokens=2)
    with pytest.raises(UnknownTaskError, match="store is empty"):
        PrefixStore(store.model).get("task_0")


def test_served_batches_lay_kv_out_once_without_concatenation_or_gqa_repeat(served, monkeypatch):
    """Serving writes new K/V into the buffers `get` laid out (no DynamicCache concatenation) and runs GQA without
    repeating K/V (the tiny model has 4 query heads over 2 kv heads); results equal the plain transformers path."""
    import transformers.integrations.sdpa_attention as sdpa
    from transformers.cache_utils import DynamicLayer

    store, *_ = served
    tasks, prompts, choices = queries()
    model = store.model
    plain = {t: Prefix(store.get(t).keys.clone(), store.get(t).values.clone()) for t in set(tasks)}  # DynamicCache
    expected_scores, expected_text = [], []
    with store.downstream():
        for task, prompt, cs in zip(tasks, prompts, choices):
            row = []
            for choice in cs:
                ids = torch.tensor([prompt + choice])
                labels = torch.tensor([[-100] * len(prompt) + choice])
                logits = forward_with_prefix(model, plain[task], ids, torch.ones_like(ids)).logits
                row.append(sequence_logprobs(logits, labels)[0][0])
            expected_scores.append(torch.stack(row))
            ids = torch.tensor([prompt])
            expected_text.append(
                generate_with_prefix(model, plain[task], ids, torch.ones_like(ids), 6, pad_token_id=PAD)
            )

    def refuse(*args, **kwargs):
        raise AssertionError("a per-call K/V copy the store should avoid")

    monkeypatch.setattr(DynamicLayer, "update", refuse)  # BufferLayer overrides it: only a DynamicCache gets here
    monkeypatch.setattr(sdpa, "repeat_kv", refuse)
    got = store.score_choices(tasks, prompts, choices, batch_size=64)
    for g, e in zip(got, expected_scores):
        torch.testing.assert_close(g, e, atol=TOL, rtol=0)
    assert store.generate(tasks, prompts, max_new_tokens=6) == [e[0] for e in expected_text]
    # the cache writes into the very buffer `get` laid out, and grows past a too small room
    prefix = store.get(tasks[:2], room=1)
    cache = prefix.to_cache()
    buffer = cache.layers[0]._buffers[0]
    k = prefix.num_virtual_tokens
    one, three = (
        torch.zeros(2, buffer.shape[1], 1, buffer.shape[-1]),
        torch.ones(2, buffer.shape[1], 3, buffer.shape[-1]),
    )
    cache.layers[0].update(one, one)
    assert cache.layers[0].keys.data_ptr() == buffer.data_ptr() == prefix.keys.data_ptr()
    cache.layers[0].update(three, three)
    grown = cache.layers[0].keys
    assert grown.shape[2] == k + 4 and torch.equal(grown[:, :, :k], prefix.keys[0])
    assert torch.equal(grown[:, :, k + 1 :], torch.ones_like(grown[:, :, k + 1 :]))
