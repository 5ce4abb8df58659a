"""Prefix tuning: one batched run equals separate runs; the three starts are what they claim."""

import torch
from conftest import small_pocket_model

from gistlib.core.prefix import Prefix
from gistlib.data import COMPACT, Episode, Example, pocket_tokenizer
from gistlib.train.prefix_tuning import random_prefix, tune_prefixes, vocab_prefix

TOK = pocket_tokenizer(4)


def model():
    return small_pocket_model(TOK, seed=5)


def episodes():
    words = ["fama", "muso", "lufu", "bado"]
    return [
        Episode(
            f"t{e}",
            [Example(w, ["GO", "DA"][(i + e) % 2], ["GO", "DA"]) for i, w in enumerate(words[: 2 + e])],
            [Example("kepi", "GO", ["GO", "DA"])],
        )
        for e in range(3)
    ]


def test_batched_tuning_equals_one_episode_at_a_time():
    m = model()
    eps = episodes()  # different numbers of demos per episode
    init = random_prefix(Prefix(torch.randn(2, 3, 1, 4, 16), torch.randn(2, 3, 1, 4, 16)), 3, seed=1)
    batched = tune_prefixes(m, init, eps, TOK, COMPACT, budgets=(0, 5), lr=1e-2)
    for e in range(3):
        alone = tune_prefixes(m, init.rows([e]), eps[e : e + 1], TOK, COMPACT, budgets=(0, 5), lr=1e-2)
        torch.testing.assert_close(batched[5].keys[:, e], alone[5].keys[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[5].values[:, e], alone[5].values[:, 0], atol=1e-5, rtol=1e-4)
    assert torch.equal(batched[0].keys, init.keys.float())
    assert (batched[5].keys - init.keys).abs().max() > 1e-3


def test_tuning_lowers_the_demo_loss():
    from gistlib.train.prefix_tuning import _episode_losses, demo_rows

    m = model()
    eps = episodes()
    init = vocab_prefix(m, range(20, 60), 3, k=4, seed=0)
    snaps = tune_prefixes(m, init, eps, TOK, COMPACT, budgets=(0, 30), lr=3e-2)
    batch, owner = demo_rows(eps, TOK, COMPACT)
    with torch.no_grad():
        before = _episode_losses(m, snaps[0], batch, owner, 3)
        after = _episode_losses(m, snaps[30], batch, owner, 3)
    assert (after < before).all()


def test_random_prefix_matches_the_reference_std_per_layer():
    ref = Prefix(
        torch.randn(3, 50, 2, 8, 16) * torch.tensor([0.5, 1.0, 4.0])[:, None, None, None, None],
        torch.randn(3, 50, 2, 8, 16),
    )
    p = random_prefix(ref, 200, seed=0)
    assert p.keys.shape == (3, 200, 2, 8, 16)
    stds = p.keys.std(dim=(1, 2, 3, 4))
    torch.testing.assert_close(stds, torch.tensor([0.5, 1.0, 4.0]), rtol=0.05, atol=0)


def test_vocab_prefix_is_the_kv_of_real_tokens_at_positions_0_to_k():
    m = model()
    p = vocab_prefix(m, [30], 1, k=3)  # pool of one token: the prefix is the K/V of "30 30 30"
    out = m(torch.tensor([[30, 30, 30]]), use_cache=True)
    torch.testing.assert_close(p.keys[0, 0], out.cache.layers[0].keys[0])
    torch.testing.assert_close(p.values[1, 0], out.cache.layers[1].values[0])
