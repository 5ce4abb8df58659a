"""Canonical gist prefixes: exact caching, offsets, leaks, PEFT, batched generation, eager vs sdpa."""

import pytest
import torch
from conftest import GIST_IDS, PAD

from gistlib.core.masks import make_causal_mask, make_gist_mask, to_additive
from gistlib.core.prefix import (
    Prefix,
    extract_prefix,
    forward_with_mask,
    forward_with_prefix,
    generate_with_prefix,
    peft_model_with_prefix,
    positions_from_mask,
    prefix_from_peft,
    prefix_to_peft,
    rope_inv_freq,
    rotate_keys,
)

TOL = 1e-4  # float32


def random_rows(demo_lengths, query_length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(3, 56, (n,), generator=g).tolist(), torch.randint(3, 56, (query_length,), generator=g).tolist())
        for n in demo_lengths
    ]


def pad_batch(seqs, side="right"):
    """list of token lists -> (input_ids, attention_mask), (B, L)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD)
    am = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        am[b, sl] = 1
    return ids, am


def single_sequence_query_logits(model, rows, side="right"):
    """Logits at the query tokens of `[demos][gists][query]` under the gist mask: list of (q, V)."""
    ids, am = pad_batch([d + GIST_IDS + q for d, q in rows], side)
    out = forward_with_mask(
        model, make_gist_mask(ids, GIST_IDS, attention_mask=am), positions_from_mask(am), input_ids=ids
    )
    result = []
    for b, (d, q) in enumerate(rows):
        start = (ids.shape[1] - am[b].sum().item() if side == "left" else 0) + len(d) + len(GIST_IDS)
        result.append(out.logits[b, start : start + len(q)])
    return result


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("hyper_side", ["left", "right"])
def test_gist_caching_is_exact(tiny_models, impl, hyper_side):
    model = tiny_models[impl]
    rows = random_rows([3, 11, 7, 20])
    expected = single_sequence_query_logits(model, rows)
    ids, am = pad_batch([d + GIST_IDS for d, _ in rows], hyper_side)
    prefix = extract_prefix(model, ids, am, GIST_IDS)
    assert prefix.keys.shape == (2, 4, 2, len(GIST_IDS), 16)  # (n, B, H_kv, k, hd): GQA, 2 kv heads
    q_ids, q_am = pad_batch([q for _, q in rows])
    got = forward_with_prefix(model, prefix, q_ids, q_am).logits
    diff = max((got[b] - expected[b]).abs().max().item() for b in range(len(rows)))
    print(f"gist caching max abs diff ({impl}, hyper {hyper_side}-padded): {diff:.3e}")
    assert diff < TOL


def test_caching_holds_with_padded_queries(tiny_models):
    """Queries of different lengths, left padded downstream: no per-row position tricks needed."""
    model = tiny_models["sdpa"]
    rows = [(d, q[:n]) for (d, q), n in zip(random_rows([4, 9, 15], 6), [2, 6, 4])]
    expected = single_sequence_query_logits(model, rows)
    prefix = extract_prefix(model, *pad_batch([d + GIST_IDS for d, _ in rows], "left"), GIST_IDS)
    for side in ("left", "right"):
        q_ids, q_am = pad_batch([q for _, q in rows], side)
        got = forward_with_prefix(model, prefix, q_ids, q_am).logits
        for b in range(len(rows)):
            real = got[b][q_am[b].bool()]
            assert (real - expected[b]).abs().max() < TOL


def test_same_demos_at_another_offset_give_the_same_prefix(tiny_models):
    model = tiny_models["sdpa"]
    rows = random_rows([6, 13])
    ids, am = pad_batch([d + GIST_IDS for d, _ in rows], "right")
    base = extract_prefix(model, ids, am, GIST_IDS)
    # extra left padding
    wide_ids = torch.cat([torch.full((2, 9), PAD), ids], 1)
    wide_am = torch.cat([torch.zeros(2, 9, dtype=torch.long), am], 1)
    padded = extract_prefix(model, wide_ids, wide_am, GIST_IDS)
    # the demos start at absolute position 37 / 101 instead of 0
    shifted = extract_prefix(
        model, ids, am, GIST_IDS, position_ids=positions_from_mask(am) + torch.tensor([[37], [101]])
    )
    for other in (padded, shifted):
        assert (other.keys - base.keys).abs().max() < 1e-5
        assert (other.values - base.values).abs().max() < 1e-5
    # the shift is real: keys left at positions +37 / +101 would differ from the canonical ones

    moved = rotate_keys(base.keys[0], torch.tensor([37.0, 101.0]), rope_inv_freq(model))
    assert (moved - base.keys[0]).abs().max() > 1e-2


def test_prefix_differs_between_rows_with_different_demos(tiny_models):
    model = tiny_models["sdpa"]
    rows = random_rows([6, 6])
    prefix = extract_prefix(model, *pad_batch([d + GIST_IDS for d, _ in rows]), GIST_IDS)
    assert (prefix.keys[:, 0] - prefix.keys[:, 1]).abs().max() > 1e-3


def _patch_kv(model, positions, source=None):
    """Hooks on every k_proj/v_proj: record outputs at `positions`, or overwrite them from `source`."""
    record, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(("k_proj", "v_proj")):

            def hook(mod, args, out, name=name):
                if source is None:
                    record[name] = out[:, positions].clone()
                    return None
                out = out.clone()
                out[:, positions] = source[name]
                return out

            handles.append(module.register_forward_hook(hook))
    return record, handles


@pytest.mark.parametrize("mask_kind", ["gist", "causal"])
def test_demos_reach_the_query_only_through_the_gists(tiny_models, mask_kind):
    """Change a demo token: query logits change. Pin the gist K/V to the old run's: they are restored.

    Under the plain causal mask the same pinning cannot restore them: the test detects a leak.
    """
    model = tiny_models["eager"]
    ((d, q),) = random_rows([8])
    seq_a = torch.tensor([d + GIST_IDS + q])
    seq_b = seq_a.clone()
    seq_b[0, 2] = (seq_b[0, 2] + 1) % 50 + 3
    am = torch.ones_like(seq_a)
    make = (lambda s: make_gist_mask(s, GIST_IDS)) if mask_kind == "gist" else (lambda s: make_causal_mask(s))
    qs = slice(len(d) + len(GIST_IDS), None)
    gist_pos = list(range(len(d), len(d) + len(GIST_IDS)))

    def run(seq):
        return forward_with_mask(model, make(seq), positions_from_mask(am), input_ids=seq).logits[0, qs]

    record, handles = _patch_kv(model, gist_pos)
    logits_a = run(seq_a)
    for h in handles:
        h.remove()
    logits_b = run(seq_b)
    assert (logits_a - logits_b).abs().max() > 1e-4  # the demo matters
    _, handles = _patch_kv(model, gist_pos, source=record)
    try:
        pinned = run(seq_b)
    finally:
        for h in handles:
            h.remove()
    leak = (pinned - logits_a).abs().max().item()
    if mask_kind == "gist":
        assert leak < 1e-6
    else:
        assert leak > 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_peft_prefix_tuning_gives_the_same_logits(impl):
    from gistlib.models.tiny import build_tiny_llama

    model = build_tiny_llama(vocab_size=64, attn_implementation=impl, seed=1)  # PEFT wraps it: own copy
    rows = random_rows([5, 12])
    prefix = extract_prefix(model, *pad_batch([d + GIST_IDS for d, _ in rows]), GIST_IDS)
    q_ids, q_am = pad_batch([q for _, q in rows])
    ours = forward_with_prefix(model, prefix, q_ids, q_am).logits
    flat = prefix_to_peft(prefix, row=1)
    assert flat.shape == (len(GIST_IDS), 2 * 2 * 2 * 16)  # (k, layers x 2 x kv_heads x hd)
    back = prefix_from_peft(flat, num_layers=2, num_kv_heads=2)
    assert torch.equal(back.keys[:, 0], prefix.keys[:, 1]) and torch.equal(back.values[:, 0], prefix.values[:, 1])
    peft_model = peft_model_with_prefix(model, prefix, row=1)
    theirs = peft_model(input_ids=q_ids[1:2], attention_mask=q_am[1:2]).logits
    diff = (theirs[0] - ours[1]).abs().max().item()
    print(f"PEFT prefix tuning vs gistlib max abs diff ({impl}): {diff:.3e}")
    assert diff < TOL
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("prompt_encoder" in n for n in trainable)


def test_batched_generation_equals_row_by_row(tiny_models):
    model = tiny_models["sdpa"]
    rows = [(d, q[:n]) for (d, q), n in zip(random_rows([4, 17, 9], 6, seed=3), [3, 6, 1])]
    prefix = extract_prefix(model, *pad_batch([d + GIST_IDS for d, _ in rows], "left"), GIST_IDS)
    for side in ("left", "right"):
        q_ids, q_am = pad_batch([q for _, q in rows], side)
        batched = generate_with_prefix(model, prefix, q_ids, q_am, max_new_tokens=8, eos_token_id=7)
        single = [
            generate_with_prefix(
                model, prefix.rows([b]), torch.tensor([q]), torch.ones(1, len(q), dtype=torch.long), 8, 7
            )[0]
            for b, (_, q) in enumerate(rows)
        ]
        assert batched == single
        assert all(len(t) >= 1 for t in batched)


def test_generation_follows_the_single_sequence_argmax(tiny_models):
    """The first generated token is the argmax of the single-sequence logits at the query's end."""
    model = tiny_models["eager"]
    rows = random_rows([5, 10], 4, seed=5)
    expected = [lg[-1].argmax().item() for lg in single_sequence_query_logits(model, rows)]
    prefix = extract_prefix(model, *pad_batch([d + GIST_IDS for d, _ in rows]), GIST_IDS)
    q_ids, q_am = pad_batch([q for _, q in rows])
    got = generate_with_prefix(model, prefix, q_ids, q_am, max_new_tokens=1)
    assert [g[0] for g in got] == expected


def test_eager_and_sdpa_agree_and_no_nan_with_padding(tiny_models):
    ids, am = pad_batch([[5, 6] + GIST_IDS + [7, 8, 9], [5] + GIST_IDS + [3], [11, 12, 13, 14]], "left")
    mask = make_gist_mask(ids, GIST_IDS, attention_mask=am)
    outs = {
        impl: forward_with_mask(m, mask, positions_from_mask(am), input_ids=ids).logits
        for impl, m in tiny_models.items()
    }
    assert all(torch.isfinite(o).all() for o in outs.values())
    diff = (outs["eager"] - outs["sdpa"]).abs().max().item()
    print(f"eager vs sdpa max abs diff: {diff:.3e}")
    assert diff < TOL


def test_boolean_mask_under_eager_attention_is_wrong(tiny_models):
    """Why `to_additive` exists: eager attention adds the mask, so True/False become +1/+0 and leak."""
    model = tiny_models["eager"]
    ids, am = pad_batch([[5, 6] + GIST_IDS + [7, 8, 9]])
    mask = make_gist_mask(ids, GIST_IDS, attention_mask=am)
    pos = positions_from_mask(am)
    right = model(input_ids=ids, attention_mask=to_additive(mask), position_ids=pos).logits
    try:
        wrong = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    except (RuntimeError, TypeError):  # a future version may refuse boolean 4-D masks outright: also fine
        return
    assert (wrong - right).abs().max() > 1e-3


def test_prefix_helpers():
    keys = torch.randn(2, 3, 2, 4, 8)
    p = Prefix(keys, keys + 1)
    assert p.num_layers == 2 and p.batch_size == 3 and p.num_virtual_tokens == 4
    assert p.rows([0, 0, 2]).batch_size == 3 and torch.equal(p.rows([2]).keys[:, 0], keys[:, 2])
    assert p.repeat_interleave(2).batch_size == 6
    assert Prefix.cat([p, p]).batch_size == 6
    assert p.nbytes() == 2 * keys.numel() * 4
    cache = p.to_cache()
    assert torch.equal(cache.layers[1].keys, keys[1]) and cache.get_seq_length() == 4


def test_extract_prefix_rejects_rows_without_gists(tiny_models):
    ids = torch.tensor([[5, 6] + GIST_IDS, [5, 6, 7, 8, 9, 10]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no gist tokens"):
        extract_prefix(tiny_models["sdpa"], ids, torch.ones_like(ids), GIST_IDS)


def _gist_mask_reference(model, ids, am):
    """The slow path, written out: one pass under the explicit gist mask, gather, re-rotate (an independent check)."""
    from transformers import DynamicCache

    from gistlib.core.prefix import canonical_prefix, gather_gist_kv, gist_positions

    index = gist_positions(ids, GIST_IDS, am)
    positions = positions_from_mask(am)
    out = forward_with_mask(
        model,
        make_gist_mask(ids, GIST_IDS, attention_mask=am),
        positions,
        input_ids=ids,
        cache=DynamicCache(config=model.config),
        use_cache=True,
    )
    keys, values = gather_gist_kv([(layer.keys, layer.values) for layer in out.cache.layers], index)
    return canonical_prefix(model, keys, values, positions.gather(1, index[:, :1]).squeeze(1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fast_causal_path_equals_the_gist_mask_pass(tiny_models, impl):
    """Unpadded rows ending in their gists run without a mask (sdpa's causal path): same prefix as the gist mask."""
    model = tiny_models[impl]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        for rows, side in (([7, 7], "left"), ([3, 9, 6], "left"), ([3, 9], "right")):
            ids, am = pad_batch([[1] + d + GIST_IDS for d, _ in random_rows(rows)], side)
            seen.clear()
            got = extract_prefix(model, ids, am, GIST_IDS)
            padded = not bool(am.bool().all())
            assert (seen[0] is not None) == padded  # the fast path is taken exactly where nothing is padded
            expected = _gist_mask_reference(model, ids, am)
            torch.testing.assert_close(got.keys, expected.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.values, expected.values, atol=1e-5, rtol=0)
        # tokens after the gists: the gist mask must hide the demos from them, so no fast path
        ids = torch.tensor([[1, 5, 6, 7, *GIST_IDS, 9, 10]])
        seen.clear()
        extract_prefix(model, ids, torch.ones_like(ids), GIST_IDS)
        assert seen[0] is not None
    finally:
        hook.remove()
