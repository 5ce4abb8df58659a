"""Prefix tuning per task, from three starts: random, real-token activations, or a HyperLlama prefix.

The tuned parameters are the prefix keys and values themselves, (n, E, H, k, hd) for E episodes at once;
the frozen model reads each episode's demos as training examples, `[BOS] x -> y [EOS]` after that
episode's prefix. The loss is the *sum* over episodes of each episode's mean loss, so each episode's
prefix gets exactly the gradient it would get alone, and Adam (elementwise) keeps them independent:
one batched run equals E separate runs.

Starts (the paper's question: is a HyperLlama prefix a better initialisation?):
    random      Gaussian, std matched per layer to a reference prefix (keys and values apart)
    vocab       K/V of k random real tokens run through the base at positions 0..k-1 (Li & Liang)
    hyperllama  the hypernetwork's prefix for the episode's demos
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gistlib.core.masks import make_causal_mask
from gistlib.core.prefix import Prefix, forward_with_mask, forward_with_prefix, positions_from_mask
from gistlib.data import IGNORE, Episode, RenderFormat, collate, render_downstream

__all__ = ["random_prefix", "vocab_prefix", "demo_rows", "tune_prefixes"]


def random_prefix(reference: Prefix, num_episodes: int, seed: int = 0) -> Prefix:
    """Gaussian prefixes (n, E, H, k, hd) with each layer's key and value std taken from `reference`."""
    g = torch.Generator().manual_seed(seed)
    n, _, H, k, hd = reference.keys.shape
    k_std = reference.keys.float().std(dim=(1, 2, 3, 4), keepdim=True)  # (n, 1, 1, 1, 1)
    v_std = reference.values.float().std(dim=(1, 2, 3, 4), keepdim=True)
    keys = torch.randn(n, num_episodes, H, k, hd, generator=g) * k_std
    values = torch.randn(n, num_episodes, H, k, hd, generator=g) * v_std
    return Prefix(keys.to(reference.keys), values.to(reference.values))  # reference's dtype and device


@torch.no_grad()
def vocab_prefix(model, token_pool: Sequence[int], num_episodes: int, k: int, seed: int = 0) -> Prefix:
    """K/V of k random tokens from `token_pool` (per episode) run through `model` at positions 0..k-1."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(token_pool))
    ids = pool[torch.randint(len(pool), (num_episodes, k), generator=g)]  # (E, k)
    ids = ids.to(model.get_input_embeddings().weight.device)
    am = torch.ones_like(ids)
    out = forward_with_mask(
        model, make_causal_mask(ids), positions_from_mask(am), input_ids=ids, use_cache=True, logits_to_keep=1
    )
    keys = torch.stack([layer.keys for layer in out.cache.layers])  # (n, E, H, k, hd), already at 0..k-1
    values = torch.stack([layer.values for layer in out.cache.layers])
    return Prefix(keys, values)


def demo_rows(episodes: Sequence[Episode], tokenizer, fmt: RenderFormat, max_tokens: int = 256):
    """Every episode's demos as downstream training rows: collated batch and the owner episode per row."""
    rows, owner = [], []
    for e, ep in enumerate(episodes):
        for d in ep.demos:
            rows.append(render_downstream(d, tokenizer, fmt, max_tokens, task=ep.task))
            owner.append(e)
    return collate(rows, tokenizer.pad_token_id), torch.tensor(owner)


def _episode_losses(model, prefix: Prefix, batch, owner: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """Mean answer loss per episode (E,), each row after its episode's prefix."""
    logits = forward_with_prefix(model, prefix.rows(owner), batch["input_ids"], batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp(min=0), reduction="none")
    keep = (target != IGNORE).float()
    row_loss = (ce * keep).sum(1) / keep.sum(1).clamp(min=1)  # (R,)
    per_ep = torch.zeros(num_episodes).index_add_(0, owner, row_loss)
    counts = torch.zeros(num_episodes).index_add_(0, owner, torch.ones_like(row_loss))
    return per_ep / counts.clamp(min=1)


def tune_prefixes(
    model,
    init: Prefix,
    episodes: Sequence[Episode],
    tokenizer,
    fmt: RenderFormat,
    budgets: Sequence[int] = (0, 10, 25, 50, 100, 200),
    lr: float = 1e-2,
    on_budget: Callable[[int, Prefix], None] | None = None,
    max_tokens: int = 256,
) -> dict[int, Prefix]:
    """Adam on the prefix K/V for max(budgets) steps, on each episode's demos; snapshots at each budget.

    model: frozen downstream model (adapters off). init: (n, E, H, k, hd), E = len(episodes).
    `on_budget(steps, prefix)` is called at each budget (e.g. to evaluate); returns {budget: Prefix}.
    max_tokens: the budget of one demo row `[BOS] x y [EOS]`.
    """
    if init.batch_size != len(episodes):
        raise ValueError(f"init holds {init.batch_size} prefixes for {len(episodes)} episodes")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only the prefix trains (restored on return)
    keys = init.keys.detach().clone().float().requires_grad_(True)
    values = init.values.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([keys, values], lr=lr)
    batch, owner = demo_rows(episodes, tokenizer, fmt, max_tokens)
    device = init.keys.device
    batch, owner = {k: v.to(device) for k, v in batch.items()}, owner.to(device)
    snapshots: dict[int, Prefix] = {}
    for step in range(max(budgets) + 1):
        if step in budgets:
            snapshots[step] = Prefix(keys.detach().clone(), values.detach().clone())
            if on_budget is not None:
                on_budget(step, snapshots[step])
        if step == max(budgets):
            break
        loss = _episode_losses(model, Prefix(keys, values), batch, owner, len(episodes)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, flag in flags:
        p.requires_grad_(flag)
    return snapshots
