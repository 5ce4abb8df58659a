"""Episodes to token ids: the four sequences of the method, token-budgeted, and their collation.

With the VERBOSE format (the paper's) and gist tokens G_1..G_k:

    hyper input   [BOS] definition demo_1 ... demo_n G_1 ... G_k                      (no labels)
    downstream    [BOS] "\\nInput:\\n" x "\\nOutput:\\n" y [EOS]                        labels on y, EOS
    ICL           [BOS] definition demo_1 ... demo_n "\\nInput:\\n" x "\\nOutput:\\n" y [EOS]
    gisting       [BOS] definition demo_1 ... demo_n G_1 ... G_k "\\nInput:\\n" x "\\nOutput:\\n" y [EOS]

    demo_i = "\\nInput:\\n" x_i "\\nOutput:\\n" y_i

The COMPACT format (pocket tier) writes a demo as `x y ;` and a query as `x ->`, e.g. with a word
tokenizer `[BOS] bafo KE dumi ZO ; lupa ->  ZO [EOS]` (DESIGN 5b: a compact layout let in-context learning
emerge on a 1M-parameter model; the verbose one did not within the probe's budget).

Budget rule (every renderer takes `max_tokens`): BOS, definition, gist tokens, the query and its answer
are never cut; demos are added in order while they fit and dropped whole from the first that does not.
A query (or the first demo) that cannot fit even alone raises ValueError naming the task.
Pieces are tokenized separately and concatenated, so label spans are exact.
Labels hold -100 wherever there is no loss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gistlib.core.scoring import IGNORE

from .episodes import Episode, Example


@dataclass(frozen=True)
class RenderFormat:
    """How text pieces are laid out. Every field is literal text placed around an input/output."""

    definition_prefix: str = "Definition:\n"  # before the task definition (only when there is one)
    definition_suffix: str = "\n"  # after it
    demo_input_prefix: str = "\nInput:\n"  # demo: demo_input_prefix x demo_output_prefix y demo_suffix
    demo_output_prefix: str = "\nOutput:\n"
    demo_suffix: str = ""
    query_input_prefix: str = "\nInput:\n"  # query: query_input_prefix x query_output_prefix | y EOS
    query_output_prefix: str = "\nOutput:\n"
    answer_prefix: str = ""  # text before the answer inside the labelled span (e.g. " " for BPE)
    # what ends an answer: "" = the tokenizer's EOS token; text (e.g. "\n") = that text, for a base that ends
    # answers in context so (an instruct tokenizer's EOS after an answer scores about -8 on SmolLM2, "\n" -0.1 to
    # -1.2); generation then stops at any token holding it (`stop_token_ids`) and cuts the answer there
    answer_end: str = ""


VERBOSE = RenderFormat()
COMPACT = RenderFormat(
    definition_prefix="",
    definition_suffix=" ;",
    demo_input_prefix=" ",
    demo_output_prefix=" ",
    demo_suffix=" ;",
    query_input_prefix=" ",
    query_output_prefix=" ->",
    answer_prefix=" ",
)


# ----------------------------------------------------------------------------- pieces


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone (no special tokens added); [] for the empty string."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def definition_ids(definition: str | None, tokenizer, fmt: RenderFormat) -> list[int]:
    if not definition:
        return []
    return encode(tokenizer, fmt.definition_prefix + definition + fmt.definition_suffix)


def demo_ids(demo: Example, tokenizer, fmt: RenderFormat) -> list[int]:
    """One demo: `demo_input_prefix x demo_output_prefix y demo_suffix`, tokenized as one piece."""
    return encode(
        tokenizer, fmt.demo_input_prefix + demo.input + fmt.demo_output_prefix + demo.output + fmt.demo_suffix
    )


def query_ids(query: Example, tokenizer, fmt: RenderFormat) -> list[int]:
    """The query part without its answer: `query_input_prefix x query_output_prefix`."""
    return encode(tokenizer, fmt.query_input_prefix + query.input + fmt.query_output_prefix)


def answer_ids(answer: str, tokenizer, fmt: RenderFormat = VERBOSE) -> list[int]:
    """Ids of an answer (or of one answer choice, for rank classification) followed by its end: EOS, or the
    ids of `fmt.answer_end` tokenized on their own."""
    end = encode(tokenizer, fmt.answer_end) if fmt.answer_end else [tokenizer.eos_token_id]
    return encode(tokenizer, fmt.answer_prefix + answer) + end


def stop_token_ids(tokenizer, fmt: RenderFormat = VERBOSE) -> list[int]:
    """Token ids that end a greedy answer: EOS, and with `fmt.answer_end` every token whose text holds it
    (a BPE may merge "\n" with what follows it). Computed once per tokenizer, vocabulary size and ending."""
    return list(_stop_ids(tokenizer, len(tokenizer), fmt.answer_end))


@functools.lru_cache(maxsize=16)
def _stop_ids(tokenizer, size: int, answer_end: str) -> tuple[int, ...]:
    stops = {tokenizer.eos_token_id}
    if answer_end:
        vocab = tokenizer.convert_ids_to_tokens(list(range(size)))
        stops |= {i for i, t in enumerate(vocab) if t and answer_end in tokenizer.convert_tokens_to_string([t])}
    return tuple(sorted(stops))


def answer_text(tokens: Sequence[int], tokenizer, fmt: RenderFormat = VERBOSE) -> str:
    """A greedy answer's text: decoded without special tokens, cut at `fmt.answer_end`, stripped."""
    text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
    if fmt.answer_end:
        text = text.split(fmt.answer_end)[0]
    return text.strip()


def choice_ids(query: Example, tokenizer, fmt: RenderFormat = VERBOSE) -> list[list[int]]:
    """`answer_ids` of every answer choice of `query` (rank classification); error if it has none."""
    if not query.choices:
        raise ValueError(f"query {query.input[:40]!r} has no answer choices")
    return [answer_ids(c, tokenizer, fmt) for c in query.choices]


def fit_demos(demos: Sequence[Example], tokenizer, fmt: RenderFormat, budget: int, task: str) -> list[list[int]]:
    """Token ids of the demos that fit in `budget` tokens, in order: a demo that would overflow is left out and
    the later ones that still fit are kept (a long demo does not cost the short ones after it).

    If there are demos but none fits, raise ValueError naming the task."""
    kept, used = [], 0
    for d in demos:
        ids = demo_ids(d, tokenizer, fmt)
        if used + len(ids) <= budget:
            kept.append(ids)
            used += len(ids)
    if demos and not kept:
        shortest = min(len(demo_ids(d, tokenizer, fmt)) for d in demos)
        raise ValueError(f"task {task!r}: no demo fits: the shortest needs {shortest} tokens, {budget} are left")
    return kept


def _check_fixed(fixed: int, max_tokens: int, task: str, what: str) -> None:
    if fixed > max_tokens:
        raise ValueError(f"task {task!r}: {what} needs {fixed} tokens, more than max_tokens={max_tokens}")


def _prefix_with_demos(
    episode: Episode, tokenizer, fmt: RenderFormat, max_tokens: int, tail: int, what: str
) -> list[int]:
    """[BOS] definition demos..., leaving `tail` tokens of the budget for what follows the demos."""
    head = [tokenizer.bos_token_id] + definition_ids(episode.definition, tokenizer, fmt)
    _check_fixed(len(head) + tail, max_tokens, episode.task, what)
    demos = fit_demos(episode.demos, tokenizer, fmt, max_tokens - len(head) - tail, episode.task)
    return head + [t for d in demos for t in d]


# ----------------------------------------------------------------------------- the four sequences


def render_hyper_input(
    episode: Episode, tokenizer, gist_ids: list[int], fmt: RenderFormat = VERBOSE, max_tokens: int = 1024
) -> list[int]:
    """Hypernetwork input `[BOS] definition demos G_1..G_k` (ids, length <= max_tokens). No labels."""
    return _prefix_with_demos(episode, tokenizer, fmt, max_tokens, len(gist_ids), "definition + gists") + list(gist_ids)


def render_downstream_prompt(
    query: Example,
    tokenizer,
    fmt: RenderFormat = VERBOSE,
    max_tokens: int = 1024,
    task: str = "?",
    reserve: int = 0,
) -> list[int]:
    """`[BOS] query-part` for generation or scoring; `reserve` tokens of the budget are kept for an answer."""
    ids = [tokenizer.bos_token_id] + query_ids(query, tokenizer, fmt)
    _check_fixed(len(ids) + reserve, max_tokens, task, "the query")
    return ids


def render_downstream(
    query: Example, tokenizer, fmt: RenderFormat = VERBOSE, max_tokens: int = 1024, task: str = "?"
) -> tuple[list[int], list[int]]:
    """Downstream input `[BOS] "\\nInput:\\n" x "\\nOutput:\\n" y [EOS]` and labels (y and EOS only)."""
    ans = answer_ids(query.output, tokenizer, fmt)
    prompt = render_downstream_prompt(query, tokenizer, fmt, max_tokens, task, reserve=len(ans))
    return _with_labels(prompt, ans)


def render_icl_prompt(
    episode: Episode,
    query: Example,
    tokenizer,
    fmt: RenderFormat = VERBOSE,
    max_tokens: int = 1024,
    reserve: int = 0,
) -> list[int]:
    """`[BOS] definition demos query-part` (the full-attention baseline's prompt), `reserve` kept for the answer."""
    q = query_ids(query, tokenizer, fmt)
    return _prefix_with_demos(episode, tokenizer, fmt, max_tokens, len(q) + reserve, "the query") + q


def render_icl(
    episode: Episode, query: Example, tokenizer, fmt: RenderFormat = VERBOSE, max_tokens: int = 1024
) -> tuple[list[int], list[int]]:
    """In-context input: demos and query in one sequence; labels on y and EOS."""
    ans = answer_ids(query.output, tokenizer, fmt)
    return _with_labels(render_icl_prompt(episode, query, tokenizer, fmt, max_tokens, reserve=len(ans)), ans)


def render_gisting_prompt(
    episode: Episode,
    query: Example,
    tokenizer,
    gist_ids: list[int],
    fmt: RenderFormat = VERBOSE,
    max_tokens: int = 1024,
    reserve: int = 0,
) -> list[int]:
    """`[BOS] definition demos G_1..G_k query-part`, `reserve` tokens kept for the answer."""
    q = query_ids(query, tokenizer, fmt)
    head = _prefix_with_demos(episode, tokenizer, fmt, max_tokens, len(gist_ids) + len(q) + reserve, "gists + query")
    return head + list(gist_ids) + q


def render_gisting(
    episode: Episode,
    query: Example,
    tokenizer,
    gist_ids: list[int],
    fmt: RenderFormat = VERBOSE,
    max_tokens: int = 1024,
) -> tuple[list[int], list[int]]:
    """Single-sequence gisting input `[BOS] definition demos G_1..G_k query-part y [EOS]`; labels on y, EOS."""
    ans = answer_ids(query.output, tokenizer, fmt)
    prompt = render_gisting_prompt(episode, query, tokenizer, gist_ids, fmt, max_tokens, reserve=len(ans))
    return _with_labels(prompt, ans)


def _with_labels(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    return prompt + answer, [IGNORE] * len(prompt) + list(answer)


# ----------------------------------------------------------------------------- batching


def collate(
    rows: Sequence[tuple[list[int], list[int]]] | Sequence[list[int]],
    pad_id: int,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad rows to one length. Returns `input_ids`, `attention_mask` (1 = real token), `labels`, each (B, T) long.

    Rows are `(ids, labels)` pairs or plain id lists; for a plain list the labels are the ids
    (language modelling). Labels are -100 on padding."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    pairs = [(list(r[0]), list(r[1])) if isinstance(r, tuple) else (list(r), list(r)) for r in rows]
    for i, (ids, labels) in enumerate(pairs):
        if len(ids) != len(labels):
            raise ValueError(f"row {i}: {len(ids)} ids but {len(labels)} labels")
    T = max((len(ids) for ids, _ in pairs), default=0)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        span = slice(0, len(ids)) if padding_side == "right" else slice(T - len(ids), T)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
        labels[i, span] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
