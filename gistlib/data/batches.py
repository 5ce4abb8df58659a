"""Batch streams for every training stage, from tasks (or a corpus) to padded tensors.

    icl_batches             [BOS] demos query answer              the pocket base (causal mask)
    gisting_batches         [BOS] demos G_1..G_k query answer      Gisting (gist mask)
    hyper_batches           hypernetwork: [BOS] demos G_1..G_k     HyperLlama multi-task training
                            downstream:   [BOS] query answer [EOS], several queries per task
                            teacher (optional): [BOS] demos query answer, for ICL distillation
    hyperpretrain_batches   hypernetwork: [BOS] segment_a G..;  downstream: [BOS] segment_b

Every stream is endless, seeded and reproducible (the training loop's resume replays it). The first three
read an episode stream (`sample_episodes`, or a family's own, e.g. symbol tuning's), so every data family
feeds every method.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from gistlib.data import (
    COMPACT,
    Episode,
    EpisodeSampler,
    RenderFormat,
    Task,
    collate,
    render_downstream,
    render_gisting,
    render_hyper_input,
    render_icl,
)
from gistlib.data.render import IGNORE, definition_ids, demo_ids, encode

__all__ = ["sample_episodes", "icl_batches", "gisting_batches", "hyper_batches", "hyperpretrain_batches"]


def sample_episodes(
    tasks: Sequence[Task],
    seed: int,
    num_queries: int,
    repeat_demo_prob: float = 0.0,
    num_demos: int | None = None,
    balanced: bool = False,
) -> Iterator[Episode]:
    """The endless, seeded episode stream every batch builder below reads (`EpisodeSampler` over `tasks`)."""
    sampler = EpisodeSampler(
        tasks,
        num_demos=num_demos,
        num_queries=num_queries,
        seed=seed,
        repeat_demo_prob=repeat_demo_prob,
        balanced=balanced,
    )
    return iter(sampler)


def _single_sequence_batches(episodes: Iterator[Episode], render, pad_id: int, batch_size: int):
    """Batches of one rendered (ids, labels) row per episode, on its first query."""
    while True:
        rows = []
        for _ in range(batch_size):
            ep = next(episodes)
            rows.append(render(ep, ep.queries[0]))
        yield collate(rows, pad_id)


def render_icl_dense(episode: Episode, query, tokenizer, fmt: RenderFormat, max_tokens: int):
    """`render_icl`, plus labels on every demo's output tokens (dense in-context supervision).

    Each demo's answer is predictable from earlier demos of the same category, so a sequence of n demos
    teaches in-context learning n times instead of once. Demos whose output cannot be located as a
    token suffix (a BPE merge across the boundary) keep no labels.
    """
    ids, labels = render_icl(episode, query, tokenizer, fmt, max_tokens)
    labels = list(labels)
    suffix = len(encode(tokenizer, fmt.demo_suffix))
    pos = 1 + len(definition_ids(episode.definition, tokenizer, fmt))  # after BOS and definition
    for d in episode.demos:
        full = demo_ids(d, tokenizer, fmt)
        if ids[pos : pos + len(full)] != full:
            break  # demos dropped by the budget: the rest of the sequence is the query
        head = encode(tokenizer, fmt.demo_input_prefix + d.input + fmt.demo_output_prefix)
        if full[: len(head)] == head:
            for i in range(pos + len(head), pos + len(full) - suffix):
                labels[i] = ids[i]
        pos += len(full)
    return ids, labels


def _with_copied_demos(episodes: Iterator[Episode], prob: float, seed: int) -> Iterator[Episode]:
    """With probability `prob`, replace an episode's n demos by n//2 of them, each twice, shuffled."""
    rng = random.Random(f"copied-demos-{seed}")
    for ep in episodes:
        if len(ep.demos) >= 2 and rng.random() < prob:
            half = ep.demos[: len(ep.demos) // 2]
            demos = half + half
            rng.shuffle(demos)
            ep = Episode(ep.task, demos, ep.queries, ep.definition)
        yield ep


def icl_batches(
    episodes: Iterator[Episode],
    tokenizer,
    batch_size: int,
    seed: int = 0,
    fmt: RenderFormat = COMPACT,
    max_tokens: int = 256,
    label_demos: bool = False,
    copy_demos_prob: float = 0.0,
) -> Iterator[dict[str, torch.Tensor]]:
    """`input_ids`, `attention_mask`, `labels` (B, L): the first query of each episode, demos in context.

    label_demos also puts the loss on every demo's output (`render_icl_dense`); copy_demos_prob is the
    chance that an episode's demos are half of them, each shown twice (exact repeats: with dense labels,
    a strong copying signal early on)."""
    if copy_demos_prob > 0:
        episodes = _with_copied_demos(episodes, copy_demos_prob, seed)
    renderer = render_icl_dense if label_demos else render_icl
    render = lambda ep, q: renderer(ep, q, tokenizer, fmt, max_tokens)
    return _single_sequence_batches(episodes, render, tokenizer.pad_token_id, batch_size)


def gisting_batches(
    episodes: Iterator[Episode],
    tokenizer,
    gist_ids: list[int],
    batch_size: int,
    fmt: RenderFormat = COMPACT,
    max_tokens: int = 256,
    teacher: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Single-sequence gisting rows (B, L) from the first query of each episode, labels on the answer.

    teacher: also `icl_input_ids`, `icl_attention_mask` (B, Lt), right padded: each row without its gist
    tokens, `[BOS] demos query answer`, the in-context row that teaches it (`gistlib.core.distill`)."""
    render = lambda ep, q: render_gisting(ep, q, tokenizer, gist_ids, fmt, max_tokens)
    rows = _single_sequence_batches(episodes, render, tokenizer.pad_token_id, batch_size)
    return (_with_teacher_rows(b, set(gist_ids), tokenizer.pad_token_id) for b in rows) if teacher else rows


def _with_teacher_rows(batch: dict[str, torch.Tensor], gist_ids: set[int], pad_id: int) -> dict[str, torch.Tensor]:
    """`batch` plus each row's real tokens without the gists, right padded, as `icl_*` (B, Lt)."""
    real = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    rows = [[t for t in row if t not in gist_ids] for row in real]
    teacher = collate(rows, pad_id)
    return batch | {"icl_input_ids": teacher["input_ids"], "icl_attention_mask": teacher["attention_mask"]}


def hyper_batches(
    episodes: Iterator[Episode],
    tokenizer,
    gist_ids: list[int],
    tasks_per_batch: int,
    fmt: RenderFormat = COMPACT,
    max_hyper_tokens: int = 256,
    max_tokens: int = 64,
    teacher_queries: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """HyperLlama multi-task batches from an episode stream: `hyper_*` (T, Lh) left padded, downstream rows
    (T*Q, L) for every query, and `task_index` (T*Q,) naming each row's task.

    teacher_queries: for the first this many queries of each task, also the in-context row
    `[BOS] demos query answer` (`icl_input_ids`, `icl_attention_mask`: (R, Lt) right padded) and
    `icl_rows` (R,), the downstream row each teaches (`gistlib.core.distill`). 0: none.
    """
    while True:
        hyper_rows, down_rows, index, icl, icl_rows = [], [], [], [], []
        for t in range(tasks_per_batch):
            ep = next(episodes)
            hyper_rows.append(render_hyper_input(ep, tokenizer, gist_ids, fmt, max_hyper_tokens))
            for i, q in enumerate(ep.queries):
                if i < teacher_queries:
                    icl.append(render_icl(ep, q, tokenizer, fmt, max_hyper_tokens + max_tokens))
                    icl_rows.append(len(down_rows))
                down_rows.append(render_downstream(q, tokenizer, fmt, max_tokens, task=ep.task))
                index.append(t)
        h = collate(hyper_rows, tokenizer.pad_token_id, padding_side="left")
        d = collate(down_rows, tokenizer.pad_token_id)
        batch = {"hyper_input_ids": h["input_ids"], "hyper_attention_mask": h["attention_mask"], **d}
        batch["task_index"] = torch.tensor(index)
        if icl:
            teacher = collate(icl, tokenizer.pad_token_id)
            batch |= {"icl_input_ids": teacher["input_ids"], "icl_attention_mask": teacher["attention_mask"]}
            batch["icl_rows"] = torch.tensor(icl_rows)
        yield batch


def hyperpretrain_batches(
    documents: Sequence[str],
    tokenizer,
    gist_ids: list[int],
    batch_size: int,
    context_tokens: int = 48,
    continuation_tokens: int = 16,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Hyperpretraining on plain text: the hypernetwork reads a context segment (then the gists), the
    downstream model predicts the continuation (loss on every continuation token) from the prefix alone.
    Documents shorter than context + continuation + 1 tokens are skipped (counted in `ValueError` if none fit).
    """
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    need = context_tokens + continuation_tokens
    usable = [e for e in encoded if len(e) >= need]
    if not usable:
        raise ValueError(f"no document has {need} tokens: lower context_tokens/continuation_tokens")
    rng = random.Random(seed)
    bos = tokenizer.bos_token_id
    while True:
        hyper_rows, down_rows = [], []
        for _ in range(batch_size):
            doc = rng.choice(usable)
            start = rng.randint(0, len(doc) - need)
            ctx = doc[start : start + context_tokens]
            cont = doc[start + context_tokens : start + need]
            hyper_rows.append([bos, *ctx, *gist_ids])
            down_rows.append(([bos, *cont], [IGNORE, *cont]))
        h = collate(hyper_rows, tokenizer.pad_token_id, padding_side="left")
        d = collate(down_rows, tokenizer.pad_token_id)
        yield {"hyper_input_ids": h["input_ids"], "hyper_attention_mask": h["attention_mask"], **d}
