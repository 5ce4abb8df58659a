"""Rows of very different lengths run as two passes with less padding (`length_groups`, `trimmed_groups`,
`by_length`): the prefixes, logits and teacher states are those of each row run alone, and the gradients those of
one pass."""

import pytest
import torch
from conftest import GIST_IDS, PAD

import gistlib.core.prefix as prefix_module
from gistlib.core.distill import teacher_hidden_states
from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.lm import LMTrainee
from gistlib.core.prefix import by_length, length_groups, positions_from_mask
from gistlib.models.tiny import build_tiny_llama

LENGTHS = [3, 25, 4, 24, 5, 3, 26, 4, 22, 6]  # short and long rows, interleaved


def rows(lengths=LENGTHS, seed=0, gists=False) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        body = torch.randint(3, 56, (n,), generator=g).tolist()
        out.append([1, *body, *GIST_IDS] if gists else [1, *body])
    return out


def padded(batch: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    fill = [[PAD] * (width - len(r)) for r in batch]
    ids = torch.tensor([f + r if side == "left" else r + f for r, f in zip(batch, fill)])
    return ids, (ids != PAD).long()


def test_groups_split_short_from_long_rows_only_when_it_pays():
    _, mask = padded(rows(), "right")
    short, long = length_groups(mask)
    assert sorted(torch.cat([short, long]).tolist()) == list(range(len(LENGTHS)))
    assert {LENGTHS[i] for i in short.tolist()} == {3, 4, 5, 6} and min(LENGTHS[i] for i in long.tolist()) >= 22
    assert len(length_groups(padded(rows([10, 11, 12, 10, 11, 12, 10, 11]), "right")[1])) == 1  # little padding
    assert len(length_groups(padded(rows([3, 25, 4, 24]), "right")[1])) == 1  # too few rows for two groups


@pytest.mark.parametrize("side", ["right", "left"])
def test_by_length_equals_each_row_alone_and_zeros_the_padding(side):
    model = build_tiny_llama(vocab_size=64, seed=0).eval()
    ids, mask = padded(rows(), side)
    calls = []

    def run(i, m):
        calls.append(i.shape)
        return (model(input_ids=i, attention_mask=m, position_ids=positions_from_mask(m)).logits,)

    (logits,) = by_length(run, ids, mask)
    assert len(calls) == 2 and max(c[1] for c in calls) == ids.shape[1] and min(c[1] for c in calls) < 10
    for r, n in enumerate(mask.sum(1).tolist()):
        real = slice(0, n) if side == "right" else slice(ids.shape[1] - n, None)
        alone = model(input_ids=ids[r : r + 1, real]).logits[0]
        torch.testing.assert_close(logits[r, real], alone, atol=1e-5, rtol=1e-5)
    short = length_groups(mask)[0]
    width = int(mask[short].sum(1).max())
    trimmed = logits[short, width:] if side == "right" else logits[short, : ids.shape[1] - width]
    assert bool((trimmed == 0).all())  # trimmed columns come back as zeros, on the padding side


def test_hyperllama_prefixes_of_a_mixed_batch_are_each_rows_own():
    hyper = HyperLlama(build_tiny_llama(vocab_size=64, seed=0), GIST_IDS, HyperConfig(num_gist_tokens=len(GIST_IDS)))
    hyper.merge_lora_for_inference = False
    ids, mask = padded(rows(gists=True), "left")
    assert len(length_groups(mask)) == 2
    with torch.no_grad():
        batch = hyper.make_prefix(ids, mask)
        for r, n in enumerate(mask.sum(1).tolist()):
            alone = hyper.make_prefix(ids[r : r + 1, -n:], mask[r : r + 1, -n:])
            torch.testing.assert_close(batch.keys[:, r], alone.keys[:, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.values[:, r], alone.values[:, 0], atol=1e-5, rtol=1e-5)


def test_gisting_logits_and_teacher_states_of_a_mixed_batch_are_each_rows_own():
    model = build_tiny_llama(vocab_size=64, seed=0).eval()
    trainee = LMTrainee(model, "gist", GIST_IDS)
    ids, mask = padded([r[:2] + GIST_IDS + r[2:] for r in rows()], "right")
    t_ids, t_mask = padded(rows(), "right")
    with torch.no_grad():
        logits = trainee.logits(ids, mask)
        states = teacher_hidden_states(model, t_ids, t_mask)
        for r, n in enumerate(mask.sum(1).tolist()):
            torch.testing.assert_close(logits[r, :n], trainee.logits(ids[r : r + 1, :n], mask[r : r + 1, :n])[0])
            m = int(t_mask[r].sum())
            alone = teacher_hidden_states(model, t_ids[r : r + 1, :m], t_mask[r : r + 1, :m])
            for s, a in zip(states, alone):
                torch.testing.assert_close(s[r, :m], a[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("teacher", [False, True])
def test_grouped_gradients_equal_one_pass(monkeypatch, teacher):
    """HyperLlama's training step through both grouped passes (hypernetwork, teacher) gives the gradients of
    the same step with grouping switched off."""

    def grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        config = HyperConfig(num_gist_tokens=len(GIST_IDS))
        hyper = HyperLlama(build_tiny_llama(vocab_size=64, seed=0), GIST_IDS, config)
        with torch.no_grad():
            for n, p in hyper.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        h_ids, h_mask = padded(rows(gists=True), "left")
        down = torch.randint(3, 56, (len(LENGTHS), 5), generator=torch.Generator().manual_seed(1))
        labels = torch.full_like(down, -100)
        labels[:, -2:] = down[:, -2:]
        extra = {}
        if teacher:
            t_ids, t_mask = padded([r + d.tolist() for r, d in zip(rows(), down)], "right")
            extra = {"icl_input_ids": t_ids, "icl_attention_mask": t_mask, "distill_weight": 1.0}
        hyper.loss_and_backward(h_ids, h_mask, down, torch.ones_like(down), labels, **extra)
        return {n: p.grad.clone() for n, p in hyper.named_parameters() if p.grad is not None}

    grouped = grads()
    whole = lambda mask, **_: [torch.arange(mask.shape[0])]  # noqa: E731
    monkeypatch.setattr(prefix_module, "length_groups", whole)  # every grouped pass goes through this one name
    one_pass = grads()
    assert grouped.keys() == one_pass.keys() and len(grouped) > 0
    for n in grouped:
        torch.testing.assert_close(grouped[n], one_pass[n], atol=1e-5, rtol=1e-4, msg=n)
