"""One evaluation for every method, on the same held-out episodes.

A *method* turns an (episode, query) pair into a model input and scores it. Four kinds cover the paper:

    zero_shot     base model, `[BOS] query`                          no demos at all
    icl           base model, `[BOS] demos query`                    full attention: the upper reference
    gisting       gisting model: prefix = its gist K/V over `[BOS] demos G..`, then `query` (gist caching is exact)
    prefix        frozen base after a per-episode Prefix (hyperllama, prefix tuning from any start)

Classification (queries with `choices`) is rank classification: every choice is scored by the *sum*
of log-probabilities of its tokens and EOS (no length normalisation; pocket choices are all one token
plus EOS), the best one is the prediction. Generation (no choices) is greedy decoding, scored by exact
match and ROUGE-L against the references (`gistlib.data.metrics`); an answer ends at EOS or at the
format's `answer_end` (e.g. a newline, for a base whose instruct EOS does not follow answers in context).

Accuracy is averaged per episode first (each episode has the same number of queries); the 95% interval
is a percentile bootstrap over episodes. Generation's intervals (exact match and ROUGE-L) resample
episodes (one per task on SNI) and then the instances within each (`two_level_interval`), and every
episode gets its own interval over its instances (`per_task`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

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
from gistlib.data import IGNORE, Episode, Example, RenderFormat, collate, render_downstream_prompt, render_icl_prompt
from gistlib.data.metrics import exact_match, rouge_l
from gistlib.data.render import answer_ids, answer_text, query_ids, render_hyper_input, stop_token_ids

__all__ = [
    "Method",
    "zero_shot",
    "definition_only",
    "icl",
    "gisting",
    "with_prefixes",
    "hyper_prefixes",
    "gist_prefixes",
    "evaluate",
    "score_choice_ids",
    "choice_scores",
    "generate_ids",
    "EvalResult",
    "bootstrap_interval",
    "two_level_interval",
]

NORMALISATION = "sum of token log-probabilities over the choice and EOS (no length normalisation)"


@dataclass
class Method:
    """How one method reads an episode.

    prompt(e, episode, query) -> token ids before the answer; logits(episode_indices, batch, keep) -> logits
    (B, keep, V) of the rows' last `keep` positions; `prefixes` (optional) holds one prefix per episode.
    """

    name: str
    prompt: Callable[[int, Episode, Example], list[int]]
    logits: Callable[[torch.Tensor, dict[str, torch.Tensor], int], torch.Tensor]
    model: torch.nn.Module
    prefixes: Prefix | None = None


def _causal_logits(model):
    def run(_, batch, keep: int = 0):
        mask = make_causal_mask(batch["input_ids"], attention_mask=batch["attention_mask"])
        positions = positions_from_mask(batch["attention_mask"])
        return forward_with_mask(model, mask, positions, input_ids=batch["input_ids"], logits_to_keep=keep).logits

    return run


def _prefix_logits(model, prefixes: Prefix):
    def run(episode_index, batch, keep: int = 0):
        rows = prefixes.rows(episode_index)
        return forward_with_prefix(model, rows, batch["input_ids"], batch["attention_mask"], logits_to_keep=keep).logits

    return run


def zero_shot(model, tokenizer, fmt: RenderFormat) -> Method:
    """The base model on `[BOS] query`: what the model knows without demos (chance by construction)."""
    return Method(
        "zero_shot",
        lambda e, ep, q: render_downstream_prompt(q, tokenizer, fmt, task=ep.task),
        _causal_logits(model),
        model,
    )


def definition_only(model, tokenizer, fmt: RenderFormat, max_tokens: int = 1024) -> Method:
    """The base model on `[BOS] definition query`: zero-shot with the task's instruction (SNI) but no demos."""
    return Method(
        "definition_only",
        lambda e, ep, q: render_icl_prompt(replace(ep, demos=[]), q, tokenizer, fmt, max_tokens, reserve=8),
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


def _prefixes_in_batches(make, episodes, tokenizer, gist_ids, fmt, max_tokens, batch_size, device="cpu") -> Prefix:
    """One prefix per episode: `make(input_ids, attention_mask)` over `[BOS] demos G..` rows, in batches."""
    out = []
    for i in range(0, len(episodes), batch_size):
        rows = [render_hyper_input(ep, tokenizer, gist_ids, fmt, max_tokens) for ep in episodes[i : i + batch_size]]
        b = collate(rows, tokenizer.pad_token_id, padding_side="left")
        out.append(make(b["input_ids"].to(device), b["attention_mask"].to(device)))
    return Prefix.cat(out).detach()


@torch.no_grad()
def hyper_prefixes(
    hyper, episodes: Sequence[Episode], tokenizer, fmt: RenderFormat, max_tokens: int = 1024, batch_size: int = 64
) -> Prefix:
    """HyperLlama prefixes (n, E, H, k, hd), one per episode, from its demos."""
    gist_ids = hyper.gist_ids.tolist()
    dev = hyper.gist_embeddings.device
    return _prefixes_in_batches(hyper.make_prefix, episodes, tokenizer, gist_ids, fmt, max_tokens, batch_size, dev)


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
    return _prefixes_in_batches(make, episodes, tokenizer, gist_ids, fmt, max_tokens, batch_size, model_device(model))


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
    answers: list[list[str]] = field(default_factory=list)  # generation: the greedy answer texts, per episode

    def as_dict(self) -> dict:
        d = {"accuracy": self.accuracy, "ci95": [self.low, self.high], "n_episodes": self.n}
        if self.rouge_l is not None:
            d["rouge_l"] = self.rouge_l
        return {**d, **self.extra}


def two_level_interval(groups: Sequence[Sequence[float]], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over groups of per-group means, resampling the groups
    (tasks) and then the values (instances) inside each drawn group: both sources of sampling error."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(groups)
    means = []
    for _ in range(samples):
        total = 0.0
        for _ in range(n):
            g = groups[rng.randrange(n)]
            total += sum(g[rng.randrange(len(g))] for _ in g) / len(g)
        means.append(total / n)
    means.sort()
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def bootstrap_interval(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (resampling episodes)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


# --- rank classification and generation, written once (the runner, serving, widgets and benchmarks use these) ---

# run(owners (b,), batch of left-padded rows, keep) -> logits (b, keep, V) of the last `keep` positions
RowLogits = Callable[[torch.Tensor, dict[str, torch.Tensor], int], torch.Tensor]


@torch.no_grad()
def score_choice_ids(
    run: RowLogits,
    owners: Sequence[int],
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Rank classification: the summed log-probability of every answer choice of every query.

    Query i (prompt ids `prompts[i]`, candidate answers `choices[i]`, EOS included, and `owners[i]`, the
    episode or task whose prefix it reads) becomes rows `prompt + choice`; all rows are sorted by length,
    left padded (so they end together and only the last m + 1 logits are needed) and run `batch_size` per
    call. Returns, per query, a (C_i,) float tensor (argmax = the prediction; no length normalisation)."""
    if not len(owners) == len(prompts) == len(choices):
        raise ValueError(f"got {len(owners)} owners, {len(prompts)} prompts, {len(choices)} choice lists")
    for i, c in enumerate(choices):
        if not c or any(len(x) == 0 for x in c):
            raise ValueError(f"query {i} has no answer choices (or an empty one)")
    rows = [(q, c) for q in range(len(prompts)) for c in range(len(choices[q]))]
    rows.sort(key=lambda r: len(prompts[r[0]]) + len(choices[r[0]][r[1]]))  # less padding per batch
    scores = [torch.empty(len(c)) for c in choices]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        pairs = [
            (list(prompts[q]) + list(choices[q][c]), [IGNORE] * len(prompts[q]) + list(choices[q][c])) for q, c in chunk
        ]
        batch = {k: v.to(device) for k, v in collate(pairs, pad_token_id, "left").items()}
        keep = max(len(choices[q][c]) for q, c in chunk) + 1
        logits = run(torch.tensor([owners[q] for q, _ in chunk]), batch, keep)
        logp, _ = sequence_logprobs(logits, batch["labels"][:, -keep:])
        for (q, c), value in zip(chunk, logp.float().cpu()):
            scores[q][c] = value
    return scores


@torch.no_grad()
def generate_ids(
    model,
    prefix_rows: Callable[[list[int]], Prefix | None],
    owners: Sequence[int],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Greedy answers (new token ids, cut after EOS), each query after its owner's prefix (`prefix_rows(owners)`,
    None: no prefix), queries sorted by length and left padded, `batch_size` per call; in the order given."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        b = collate([list(prompts[i]) for i in chunk], pad_token_id, "left")
        out = generate_with_prefix(
            model,
            prefix_rows([owners[i] for i in chunk]),
            b["input_ids"].to(device),
            b["attention_mask"].to(device),
            max_new_tokens,
            eos_token_id,
            pad_token_id,
        )
        for i, tokens in zip(chunk, out):
            answers[i] = tokens
    return answers


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def choice_scores(method: Method, items, tokenizer, fmt, batch_size: int = 256) -> list[torch.Tensor]:
    """items: (episode index, episode, query with choices). Per item, (C,) summed log-probabilities."""
    prompts = [method.prompt(e, ep, q) for e, ep, q in items]
    choices = [[answer_ids(c, tokenizer, fmt) for c in q.choices] for _, _, q in items]
    owners = [e for e, _, _ in items]
    dev = model_device(method.model)
    return score_choice_ids(method.logits, owners, prompts, choices, tokenizer.pad_token_id, batch_size, dev)


def _rank_classification(method: Method, items, tokenizer, fmt, batch_size) -> list[bool]:
    """items: (episode index, episode, query). Returns correct/incorrect per item."""
    scores = choice_scores(method, items, tokenizer, fmt, batch_size)
    return [q.choices[int(s.argmax())] == q.output for (_, _, q), s in zip(items, scores)]


def _generation(method: Method, items, tokenizer, fmt, batch_size, max_new_tokens):
    """Greedy answers (ended by `stop_token_ids`); returns exact match, ROUGE-L (best over references) and the
    answer text per item."""
    rows = (lambda idx: method.prefixes.rows(idx)) if method.prefixes is not None else (lambda idx: None)
    outs = generate_ids(
        method.model, rows, [e for e, _, _ in items], [method.prompt(e, ep, q) for e, ep, q in items],
        max_new_tokens, stop_token_ids(tokenizer, fmt), tokenizer.pad_token_id, batch_size, model_device(method.model),
    )  # fmt: skip
    em, rl, texts = [], [], []
    for (_, _, q), out in zip(items, outs):
        text = answer_text(out, tokenizer, fmt)
        em.append(exact_match(text, q.all_references))
        rl.append(rouge_l(text, q.all_references))
        texts.append(text)
    return em, rl, texts


def evaluate(
    method: Method,
    episodes: Sequence[Episode],
    tokenizer,
    fmt: RenderFormat,
    batch_size: int = 256,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> EvalResult:
    """Accuracy per episode (rank classification, or exact match for generation), mean and 95% interval.

    Generation also reports ROUGE-L, the two-level intervals of both metrics, and `per_task`: per episode,
    {task, exact_match, rouge_l, rouge_l_ci95} (its interval resamples the episode's instances)."""
    items = [(e, ep, q) for e, ep in enumerate(episodes) for q in ep.queries]
    classify = [it for it in items if it[2].choices]
    generate = [it for it in items if not it[2].choices]
    per_item: dict[tuple[int, int], float] = {}
    rouge_of: dict[tuple[int, int], float] = {}
    text_of: dict[tuple[int, int], str] = {}
    if classify:
        for it, ok in zip(classify, _rank_classification(method, classify, tokenizer, fmt, batch_size)):
            per_item[(it[0], id(it[2]))] = float(ok)
    if generate:
        em, rl, texts = _generation(method, generate, tokenizer, fmt, batch_size, max_new_tokens)
        for it, m, r, text in zip(generate, em, rl, texts):
            per_item[(it[0], id(it[2]))] = float(m > 0)
            rouge_of[(it[0], id(it[2]))] = r
            text_of[(it[0], id(it[2]))] = text
    scores = [[per_item[(e, id(q))] for q in ep.queries] for e, ep in enumerate(episodes)]
    per_episode = [sum(v) / len(v) for v in scores]
    low, high = bootstrap_interval(per_episode, seed=seed)
    acc = sum(per_episode) / len(per_episode)
    result = EvalResult(method.name, per_episode, acc, low, high, len(per_episode))
    if generate:
        rouge = [[rouge_of[(e, id(q))] for q in ep.queries if (e, id(q)) in rouge_of] for e, ep in enumerate(episodes)]
        result.rouge_l = sum(map(sum, rouge)) / sum(map(len, rouge))
        result.answers = [[text_of.get((e, id(q)), "") for q in ep.queries] for e, ep in enumerate(episodes)]
        result.low, result.high = two_level_interval(scores, seed=seed)
        result.extra = {
            "rouge_l_ci95": list(two_level_interval(rouge, seed=seed)),
            "per_task": [
                {"task": ep.task, "exact_match": em_e, "rouge_l": sum(r) / len(r),
                 "rouge_l_ci95": list(bootstrap_interval(r, seed=seed))}
                for ep, em_e, r in zip(episodes, per_episode, rouge) if r
            ],
        }  # fmt: skip
    return result
