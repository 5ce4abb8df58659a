"""Gist attention masks, as pure vectorised functions.

A mask here is a boolean tensor `[B, 1, L, L]`: `mask[b, 0, i, j]` is True where query `i` may
attend key `j`. It already combines causality, padding and the gist rule, so a model needs nothing
else. `to_additive` turns it into the float mask (0 / finfo.min) that attention adds to its scores;
`gistlib.core.prefix.forward_with_mask` is the one place where that happens.

The gist rule (Mu et al. 2023), for a row whose gist tokens span positions `[f, l]`:

- queries at or before `l` see keys `j <= i` (plain causal: the gists read the instruction);
- queries after `l` see keys `j` with `f <= j <= i` (the instruction is hidden: only the gists
  carry it forward).

Pad keys are never seen; every query keeps its own position, so no row is all-masked and eager
attention never produces NaN. A row without gist tokens is plain causal + padding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "gist_span",
    "make_gist_mask",
    "make_causal_mask",
    "positive_control_mask",
    "negative_control_mask",
    "to_additive",
    "mask_to_string",
]


def _as_id_tensor(gist_token_ids: int | Iterable[int], device: torch.device) -> torch.Tensor:
    ids = [gist_token_ids] if isinstance(gist_token_ids, int) else list(gist_token_ids)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _key_is_real(input_ids: torch.Tensor, pad_token_id: int | None, attention_mask: torch.Tensor | None):
    """(B, L) bool: True at real (non-pad) tokens. `attention_mask` wins over `pad_token_id`."""
    if attention_mask is not None:
        return attention_mask.bool()
    if pad_token_id is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return input_ids != pad_token_id


def gist_span(
    input_ids: torch.Tensor, gist_token_ids: int | Iterable[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First and last gist position per row, and whether the row has gists at all.

    input_ids: (B, L). Returns `first`, `last` (B,) long and `has_gist` (B,) bool. For a row with
    no gist token, `first = last = L` (so "after the gists" is empty). Raises `ValueError` naming
    the row when a row's gist tokens are not one contiguous span.
    """
    B, L = input_ids.shape
    is_gist = torch.isin(input_ids, _as_id_tensor(gist_token_ids, input_ids.device))  # (B, L)
    pos = torch.arange(L, device=input_ids.device).expand(B, L)
    has_gist = is_gist.any(dim=1)
    first = torch.where(is_gist, pos, L).amin(dim=1)
    last = torch.where(is_gist, pos, -1).amax(dim=1)
    contiguous = is_gist.sum(dim=1) == (last - first + 1)
    bad = has_gist & ~contiguous
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"gist tokens are not one contiguous span in row(s) {rows}: put all gist tokens of a row "
            "next to each other (e.g. [demos][G_1..G_k][query])"
        )
    first = torch.where(has_gist, first, L)
    last = torch.where(has_gist, last, L)
    return first, last, has_gist


def _assemble(allowed: torch.Tensor, key_real: torch.Tensor) -> torch.Tensor:
    """allowed (B, L, L) & key not pad, | own position; returns (B, 1, L, L)."""
    L = allowed.shape[-1]
    eye = torch.eye(L, dtype=torch.bool, device=allowed.device)
    return ((allowed & key_real[:, None, :]) | eye)[:, None]


def _gist_rule(input_ids: torch.Tensor, gist_token_ids, hide_gists: bool) -> torch.Tensor:
    """(B, Lq, Lk) causal + gist rule: queries after the gists see keys from the first gist on
    (or, with `hide_gists`, only keys after the last gist: the negative control)."""
    L = input_ids.shape[1]
    first, last, _ = gist_span(input_ids, gist_token_ids)
    pos = torch.arange(L, device=input_ids.device)
    q, k = pos[None, :, None], pos[None, None, :]  # (1, Lq, 1), (1, 1, Lk)
    after = q > last[:, None, None]  # (B, Lq, 1): query is past the gists
    lowest = (last + 1 if hide_gists else first)[:, None, None]  # first key visible after the gists
    return (k <= q) & (~after | (k >= lowest))


def make_causal_mask(
    input_ids: torch.Tensor, pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain causal + padding mask, (B, 1, L, L) bool. With one pad token at position 0 (L=4)::

    key   0 1 2 3
    q0    x . . .      (a pad query sees only itself)
    q1    . x . .
    q2    . x x .
    q3    . x x x
    """
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device)
    causal = (pos[None, :] <= pos[:, None]).expand(B, L, L)  # (B, Lq, Lk)
    return _assemble(causal, _key_is_real(input_ids, pad_token_id, attention_mask))


def make_gist_mask(
    input_ids: torch.Tensor,
    gist_token_ids: int | Iterable[int],
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gist mask, (B, 1, L, L) bool. Row `a b G G c d` (gists at 2..3)::

        key   a b G G c d
        a     x . . . . .
        b     x x . . . .
        G     x x x . . .
        G     x x x x . .
        c     . . x x x .
        d     . . x x x x

    input_ids: (B, L) long. gist_token_ids: one id (a repeated `<GIST>`) or several (distinct
    `<GIST_i>`). Padding comes from `attention_mask` (B, L) if given, else from `pad_token_id`.
    """
    allowed = _gist_rule(input_ids, gist_token_ids, hide_gists=False)
    return _assemble(allowed, _key_is_real(input_ids, pad_token_id, attention_mask))


def positive_control_mask(
    input_ids: torch.Tensor, pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Positive control: no compression, tokens after the gists still see everything before them.

    This is `make_causal_mask`: the gist tokens sit in the sequence but hide nothing.
    """
    return make_causal_mask(input_ids, pad_token_id, attention_mask)


def negative_control_mask(
    input_ids: torch.Tensor,
    gist_token_ids: int | Iterable[int],
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative control: tokens after the gists see neither the instruction nor the gists::

    key   a b G G c d
    a     x . . . . .
    b     x x . . . .
    G     x x x . . .
    G     x x x x . .
    c     . . . . x .
    d     . . . . x x
    """
    allowed = _gist_rule(input_ids, gist_token_ids, hide_gists=True)
    return _assemble(allowed, _key_is_real(input_ids, pad_token_id, attention_mask))


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive float mask: 0 where attention is allowed, `finfo(dtype).min` elsewhere.

    transformers' eager attention adds the mask to the scores; a boolean mask would add 1/0 and
    silently leak. Same shape as `mask`.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"to_additive expects a boolean mask, got {mask.dtype}")
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def mask_to_string(mask: torch.Tensor, labels: list[str] | None = None) -> str:
    """Render one (L, L) or (1, L, L) boolean mask as the ASCII matrices in these docstrings."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1]).bool()
    L = m.shape[0]
    labels = labels or [str(i) for i in range(L)]
    width = max(len(s) for s in labels)
    lines = [" " * width + "  " + " ".join(s.rjust(1) for s in labels)]
    for i in range(L):
        cells = " ".join(("x" if m[i, j] else ".").rjust(len(labels[j])) for j in range(L))
        lines.append(labels[i].ljust(width) + "  " + cells)
    return "\n".join(lines)
