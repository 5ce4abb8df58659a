"""One evaluation for every method, on the same held-out episodes.

A *method* turns an (episode, query) pair into a model input and scores it. Four kinds cover the paper:

    zero_shot     base model, `[BOS] query`                          no demos at all
    icl           base model, `[BOS] demos query`                    full attention: the upper reference
    gisting       gisting model: prefix = its gist K/V over `[BOS] demos G..`, then `query` (gist caching is exact)
    prefix        frozen base after a per-episode Prefix (hyperllama, prefix tuning from any start)

Classification (queries with `choices`) is rank classification: every choice is scored by the *sum*
of log-probabilities of its tokens and EOS (no length normalisation; pocket choices are all one token
plus EOS), the best one is the prediction. Generation (no choices) is greedy decoding, scored by exact
match and ROUGE-L against the references (`gistlib.data.metrics`).

Accuracy is averaged per episode first (each episode has the same number of queries); the 95% interval
is a percentile bootstrap over episodes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gistlib.core.masks import make_causal_mask
from gistlib.core.prefix import (
    Prefix,
    extract_prefix,
    forward_with_mask,
    forward_with_prefix,
    generate_with_prefix,
    positions_from_mask,
)
from gistlib.core.scoring import sequence_logprobs
from gistlib.data import Episode, Example, RenderFormat, collate, render_downstream_prompt, render_icl_prompt
from gistlib.data.metrics import exact_match, rouge_l
from gistlib.data.render import answer_ids, query_ids, render_hyper_input

__all__ = [
    "Method",
    "zero_shot",
    "icl",
    "gisting",
    "with_prefixes",
    "hyper_prefixes",
    "gist_prefixes",
    "evaluate",
    "EvalResult",
    "bootstrap_interval",
]

NORMALISATION = "sum of token log-probabilities over the choice and EOS (no length normalisation)"


@dataclass
class Method:
    """How one method reads an episode.

    prompt(e, episode, query) -> token ids before the answer; run(episode_indices, batch) -> logits
    (B, L, V) for the rows; `prefix` (optional) holds one prefix per episode for generation.
    """

    name: str
    prompt: Callable[[int, Episode, Example], list[int]]
    logits: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    model: torch.nn.Module
    prefixes: Prefix | None = None


def _causal_logits(model):
    def run(_, batch):
        mask = make_causal_mask(batch["input_ids"], attention_mask=batch["attention_mask"])
        return forward_with_mask(
            model, mask, positions_from_mask(batch["attention_mask"]), input_ids=batch["input_ids"]
        ).logits

    return run


def _prefix_logits(model, prefixes: Prefix):
    def run(episode_index, batch):
        return forward_with_prefix(
            model, prefixes.rows(episode_index), batch["input_ids"], batch["attention_mask"]
        ).logits

    return run


def zero_shot(model, tokenizer, fmt: RenderFormat) -> Method:
    """The base model on `[BOS] query`: what the model knows without demos (chance by construction)."""
    return Method(
        "zero_shot",
        lambda e, ep, q: render_downstream_prompt(q, tokenizer, fmt, task=ep.task),
        _causal_logits(model),
        model,
    )


def icl(model, tokenizer, fmt: RenderFormat, max_tokens: int = 1024, name: str = "icl") -> Method:
    """`model` with the demos in context under full attention (the frozen base: icl; trained so: multitask_icl)."""
    return Method(
        name,
        lambda e, ep, q: render_icl_prompt(ep, q, tokenizer, fmt, max_tokens, reserve=8),
        _causal_logits(model),
        model,
    )


def with_prefixes(name: str, model, prefixes: Prefix, tokenizer, fmt: RenderFormat, bos: bool = True) -> Method:
    """The frozen `model` after episode e's prefix `prefixes.rows([e])`, reading `[BOS] query`.

    bos=False reads the query without BOS: the continuation of a gisting sequence `[BOS] demos G.. query`.
    """

    def prompt(e, ep, q):
        return render_downstream_prompt(q, tokenizer, fmt, task=ep.task) if bos else query_ids(q, tokenizer, fmt)

    return Method(name, prompt, _prefix_logits(model, prefixes), model, prefixes)


def _prefixes_in_batches(make, episodes, tokenizer, gist_ids, fmt, max_tokens, batch_size) -> Prefix:
    """One prefix per episode: `make(input_ids, attention_mask)` over `[BOS] demos G..` rows, in batches."""
    out = []
    for i in range(0, len(episodes), batch_size):
        rows = [render_hyper_input(ep, tokenizer, gist_ids, fmt, max_tokens) for ep in episodes[i : i + batch_size]]
        b = collate(rows, tokenizer.pad_token_id, padding_side="left")
        out.append(make(b["input_ids"], b["attention_mask"]))
    return Prefix.cat(out).detach()


@torch.no_grad()
def hyper_prefixes(
    hyper, episodes: Sequence[Episode], tokenizer, fmt: RenderFormat, max_tokens: int = 1024, batch_size: int = 64
) -> Prefix:
    """HyperLlama prefixes (n, E, H, k, hd), one per episode, from its demos."""
    gist_ids = hyper.gist_ids.tolist()
    return _prefixes_in_batches(hyper.make_prefix, episodes, tokenizer, gist_ids, fmt, max_tokens, batch_size)


@torch.no_grad()
def gist_prefixes(
    model,
    episodes: Sequence[Episode],
    tokenizer,
    gist_ids: list[int],
    fmt: RenderFormat,
    max_tokens: int = 1024,
    batch_size: int = 64,
) -> Prefix:
    """Gist caching for a gisting model: its gist K/V over `[BOS] demos G..`, one prefix per episode."""
    make = lambda ids, am: extract_prefix(model, ids, am, gist_ids)
    return _prefixes_in_batches(make, episodes, tokenizer, gist_ids, fmt, max_tokens, batch_size)


def gisting(model, episodes, tokenizer, gist_ids, fmt: RenderFormat, max_tokens: int = 1024) -> Method:
    """Gisting (Mu et al.): the gisting model's own gist prefix, then the query (no BOS: same sequence)."""
    return with_prefixes(
        "gisting",
        model,
        gist_prefixes(model, episodes, tokenizer, gist_ids, fmt, max_tokens),
        tokenizer,
        fmt,
        bos=False,
    )


@dataclass
class EvalResult:
    """Per-episode scores and their summary. `per_episode` is aligned with the episodes."""

    method: str
    per_episode: list[float]
    accuracy: float = 0.0
    low: float = 0.0
    high: float = 0.0
    n: int = 0
    rouge_l: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"accuracy": self.accuracy, "ci95": [self.low, self.high], "n_episodes": self.n}
        if self.rouge_l is not None:
            d["rouge_l"] = self.rouge_l
        return {**d, **self.extra}


def bootstrap_interval(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (resampling episodes)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


@torch.no_grad()
def _rank_classification(method: Method, items, tokenizer, fmt, batch_size) -> list[bool]:
    """items: (episode index, episode, query). Returns correct/incorrect per item."""
    rows, owners, index = [], [], []
    for item_no, (e, ep, q) in enumerate(items):
        prompt = method.prompt(e, ep, q)
        for c_no, choice in enumerate(q.choices):
            ans = answer_ids(choice, tokenizer, fmt)
            rows.append((prompt + ans, [-100] * len(prompt) + ans))
            owners.append((item_no, c_no))
            index.append(e)
    scores = []
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i : i + batch_size], tokenizer.pad_token_id)
        logits = method.logits(torch.tensor(index[i : i + batch_size]), b)
        scores.append(sequence_logprobs(logits, b["labels"])[0])
    flat = torch.cat(scores).tolist()
    best: dict[int, tuple[float, int]] = {}
    for (item_no, c_no), s in zip(owners, flat):
        if item_no not in best or s > best[item_no][0]:
            best[item_no] = (s, c_no)
    return [items[i][2].choices[best[i][1]] == items[i][2].output for i in range(len(items))]


@torch.no_grad()
def _generation(method: Method, items, tokenizer, batch_size, max_new_tokens) -> tuple[list[float], list[float]]:
    """Greedy answers; returns exact match and ROUGE-L per item (best over references)."""
    em, rl = [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        b = collate([method.prompt(e, ep, q) for e, ep, q in chunk], tokenizer.pad_token_id, padding_side="left")
        prefix = method.prefixes.rows([e for e, _, _ in chunk]) if method.prefixes is not None else None
        outs = generate_with_prefix(
            method.model,
            prefix,
            b["input_ids"],
            b["attention_mask"],
            max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        for (_, _, q), out in zip(chunk, outs):
            text = tokenizer.decode([t for t in out if t != tokenizer.eos_token_id]).strip()
            refs = q.all_references
            em.append(exact_match(text, refs))
            rl.append(rouge_l(text, refs))
    return em, rl


def evaluate(
    method: Method,
    episodes: Sequence[Episode],
    tokenizer,
    fmt: RenderFormat,
    batch_size: int = 256,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> EvalResult:
    """Accuracy per episode (rank classification, or exact match for generation), mean and 95% interval."""
    items = [(e, ep, q) for e, ep in enumerate(episodes) for q in ep.queries]
    classify = [it for it in items if it[2].choices]
    generate = [it for it in items if not it[2].choices]
    per_item: dict[tuple[int, int], float] = {}
    rouge: list[float] = []
    if classify:
        for it, ok in zip(classify, _rank_classification(method, classify, tokenizer, fmt, batch_size)):
            per_item[(it[0], id(it[2]))] = float(ok)
    if generate:
        em, rl = _generation(method, generate, tokenizer, batch_size, max_new_tokens)
        for it, m in zip(generate, em):
            per_item[(it[0], id(it[2]))] = float(m > 0)
        rouge = rl
    per_episode = []
    for e, ep in enumerate(episodes):
        vals = [per_item[(e, id(q))] for q in ep.queries]
        per_episode.append(sum(vals) / len(vals))
    low, high = bootstrap_interval(per_episode, seed=seed)
    acc = sum(per_episode) / len(per_episode)
    return EvalResult(
        method.name, per_episode, acc, low, high, len(per_episode), rouge_l=(sum(rouge) / len(rouge)) if rouge else None
    )
