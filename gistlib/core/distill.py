"""ICL distillation: the frozen base with the demos in context teaches the downstream model with a prefix.

An auxiliary loss for HyperLlama training that the paper does not use (README, "What we changed and
why"). The teacher is the base itself reading `[BOS] demos query answer`; the student is the same frozen
base reading `[BOS] query answer` after the generated prefix. On every query token the student's hidden
state, at every layer, should point where the teacher's does:

    distill = mean over layers, rows, query tokens of 1 - cos(h_student, h_teacher)

Cosine rather than squared error: right after BOS a zero-shot row carries activations 20x larger than
the same token with demos before it (attention-sink tokens), which would swamp a squared error. The
language-modelling loss on the answer still trains the model; this term adds a dense target (a vector
per token per layer instead of one log-probability), which is what moves a hypernetwork off the
"any symbol of the task" plateau on the pocket suite (measured in the README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gistlib.core.masks import make_causal_mask
from gistlib.core.prefix import by_length, forward_with_mask, positions_from_mask

__all__ = ["suffix_alignment", "hidden_cosine_loss", "teacher_hidden_states"]


def suffix_alignment(
    student_mask: torch.Tensor, teacher_mask: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the last `lengths[r]` real tokens of student row r with the last as many of its teacher row.

    student_mask (R, Ls), teacher_mask (R, Lt): right-padded attention masks, for HyperLlama of `[BOS] x y`
    and `[BOS] demos x y` (lengths None: every student token after BOS), for Gisting of
    `[BOS] demos G.. x y` and `[BOS] demos x y` (lengths (R,): the tokens after the last gist).
    Returns s_idx (R, L), t_idx (R, L) positions and valid (R, L) bool, L = max(lengths): token j of row
    r's aligned part sits at s_idx[r, j] in the student row and at t_idx[r, j] in the teacher row.
    """
    n = student_mask.long().sum(1)  # (R,) real student tokens, BOS included
    m = teacher_mask.long().sum(1)
    lengths = n - 1 if lengths is None else lengths.to(n)
    if bool((lengths > n - 1).any()):
        raise ValueError("lengths: more tokens to align than a student row holds after BOS")
    if bool((m < lengths + 1).any()):
        raise ValueError("a teacher row is shorter than its student row: pass `[BOS] demos query` rows as teacher")
    length = max(int(lengths.max()), 0)
    j = torch.arange(length, device=student_mask.device)[None]  # (1, L)
    valid = j < lengths[:, None]
    s_idx = ((n - lengths)[:, None] + j).clamp(max=student_mask.shape[1] - 1)
    t_idx = ((m - lengths)[:, None] + j).clamp(max=teacher_mask.shape[1] - 1)
    return s_idx, t_idx, valid


def _gather(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h (R, L, d), idx (R, L') -> (R, L', d)."""
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))


def hidden_cosine_loss(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of 1 - cos over layers, rows and aligned query tokens (scalar).

    student_hidden, teacher_hidden: one (R, Ls, d) / (R, Lt, d) tensor per layer (same count);
    masks and lengths as in `suffix_alignment`.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student layers vs {len(teacher_hidden)} teacher layers")
    s_idx, t_idx, valid = suffix_alignment(student_mask, teacher_mask, lengths)
    weight = valid.to(student_hidden[0].dtype)
    total = student_hidden[0].new_zeros(())
    for hs, ht in zip(student_hidden, teacher_hidden):
        cos = F.cosine_similarity(_gather(hs, s_idx).float(), _gather(ht, t_idx).float(), dim=-1)  # (R, L)
        total = total + ((1 - cos) * weight).sum() / weight.sum()
    return total / len(student_hidden)


@torch.no_grad()
def teacher_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hidden states after every layer, (R, Lt, d) each, of `model` on right-padded `[BOS] demos x y` rows.

    Run it on the downstream model (adapters off). The last entry is after the final norm, as in
    transformers' `output_hidden_states`. Rows of very different lengths run in two passes (`by_length`).
    """

    def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = forward_with_mask(
            model,
            make_causal_mask(ids, attention_mask=mask),
            positions_from_mask(mask),
            input_ids=ids,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return out.hidden_states[1:]

    return tuple(by_length(run, input_ids, attention_mask))
