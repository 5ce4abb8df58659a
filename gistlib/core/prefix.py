"""Gist K/V as a canonical soft prefix.

One forward pass over `[demos][G_1..G_k]` leaves, in every layer, keys and values at the k gist
positions. Llama caches keys *after* RoPE, so a gist key sits rotated at its absolute position
`p_1 ... p_k`, which differs per row (other demo lengths, other padding). RoPE is a rotation, so
rotating by minus the offset `p_1` moves the keys to positions `0 ... k-1`: the **canonical prefix**.
The downstream model then runs its own tokens at positions `k, k+1, ...` (PEFT prefix tuning uses
the same convention), and relative distances between query and gist are exactly those of the single
sequence `[demos][gists][query]`. That is why gist caching is exact and why a batch can mix tasks.

Shapes: `n` layers, `B` rows, `H` key/value heads (GQA: fewer than query heads), `k` gist tokens,
`hd` head dim. A `Prefix` holds `keys`, `values`: (n, B, H, k, hd).

The boolean masks from `gistlib.core.masks` become additive float masks in one place only:
`forward_with_mask`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.models.llama.modeling_llama import rotate_half

from gistlib.core.masks import gist_span, make_gist_mask, to_additive

__all__ = [
    "Prefix",
    "positions_from_mask",
    "forward_with_mask",
    "rotate_keys",
    "rope_inv_freq",
    "Float64Rope",
    "rope_angles_in_float64",
    "gist_positions",
    "gather_gist_kv",
    "canonical_prefix",
    "extract_prefix",
    "gists_come_last",
    "prefix_pass",
    "prefixed_causal_mask",
    "forward_with_prefix",
    "generate_with_prefix",
    "peft_wrap",
    "prefix_to_peft",
    "prefix_from_peft",
    "peft_model_with_prefix",
    "length_groups",
    "trimmed_groups",
    "rows_in_order",
    "by_length",
]


@dataclass
class Prefix:
    """A batch of canonical prefixes: keys at RoPE positions 0..k-1, values as they were.

    keys, values: (n_layers, B, H_kv, k, head_dim).
    """

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[3]

    def rows(self, index: torch.Tensor | list[int] | slice) -> Prefix:
        """Select (or repeat) rows: `prefix.rows([0, 0, 1])` -> batch of 3."""
        return Prefix(self.keys[:, index], self.values[:, index])

    def repeat_interleave(self, repeats: int) -> Prefix:
        """Each task's prefix `repeats` times in a row, for several queries per task."""
        return Prefix(self.keys.repeat_interleave(repeats, 1), self.values.repeat_interleave(repeats, 1))

    def to(self, *args, **kwargs) -> Prefix:
        return Prefix(self.keys.to(*args, **kwargs), self.values.to(*args, **kwargs))

    def detach(self) -> Prefix:
        return Prefix(self.keys.detach(), self.values.detach())

    def to_cache(self, config=None) -> DynamicCache:
        """A fresh transformers cache holding the prefix (a cache grows in place: one per call)."""
        layers = [(self.keys[i], self.values[i]) for i in range(self.num_layers)]
        return DynamicCache(layers, config=config)

    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        return self.keys.numel() * self.keys.element_size() * 2

    @staticmethod
    def cat(prefixes: Iterable[Prefix]) -> Prefix:
        """Concatenate along the batch dimension."""
        ps = list(prefixes)
        return Prefix(torch.cat([p.keys for p in ps], 1), torch.cat([p.values for p in ps], 1))


def length_groups(attention_mask: torch.Tensor, min_saving: float = 0.2, min_rows: int = 4) -> list[torch.Tensor]:
    """Rows of a padded batch (B, L) in at most two groups of similar real length, to run one pass per group
    with less padding: [all rows] unless splitting saves at least `min_saving` of the padded tokens.

    Rows are sorted by real length (stable) and split where `rows x longest row` summed over both groups is
    least, each group at least `min_rows` rows. On pocket HyperLlama batches a third of the hypernetwork's
    and the teacher's tokens were padding. The caller trims each group's padding columns and puts the rows
    back with `torch.cat(groups).argsort()`.
    """
    lengths = attention_mask.long().sum(1)
    b = lengths.shape[0]
    order = lengths.argsort(stable=True)
    whole = [torch.arange(b, device=lengths.device)]
    if b < 2 * min_rows:
        return whole
    sorted_len = lengths[order].tolist()
    cost, cut = min((i * sorted_len[i - 1] + (b - i) * sorted_len[-1], i) for i in range(min_rows, b - min_rows + 1))
    if cost > (1 - min_saving) * b * sorted_len[-1]:
        return whole
    return [order[:cut], order[cut:]]


def padding_side(attention_mask: torch.Tensor) -> str | None:
    """'left' when every row ends on a real token, else 'right' when every row starts on one, else None."""
    if bool(attention_mask[:, -1].all()):
        return "left"
    if bool(attention_mask[:, 0].all()):
        return "right"
    return None


def trimmed_groups(attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """The passes of a padded batch (B, L) with its rows grouped by length: (rows, columns) per pass, the columns
    trimmed of the group's padding on the batch's padding side; [] when one pass over the whole batch is best
    (`length_groups` finds one group, or the padding is neither all left nor all right). The rows go back in
    order with `rows_in_order(groups)`."""
    side = padding_side(attention_mask)
    groups = length_groups(attention_mask) if side is not None else []
    if len(groups) < 2:
        return []
    passes = []
    for rows in groups:
        width = int(attention_mask[rows].sum(1).max())
        passes.append((rows, slice(-width, None) if side == "left" else slice(0, width)))
    return passes


def rows_in_order(groups: Sequence[tuple[torch.Tensor, slice]]) -> torch.Tensor:
    """The index (B,) that puts the groups' rows, concatenated, back in batch order."""
    return torch.cat([rows for rows, _ in groups]).argsort()


def by_length(
    run: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> list[torch.Tensor]:
    """`run(input_ids, attention_mask)` on a padded batch (B, L), one call per pass of `trimmed_groups`; each
    output (B, L, ...) is put back together in row order, zeros at the trimmed positions (positions that are
    padding anyway, on the batch's padding side). Gradients flow through. One call when the rows are of similar
    length."""
    groups = trimmed_groups(attention_mask)
    if not groups:
        return list(run(input_ids, attention_mask))
    width = input_ids.shape[1]
    parts = []
    for rows, cols in groups:
        outs = run(input_ids[rows, cols], attention_mask[rows, cols])
        parts.append([F.pad(t, (0, 0) * (t.dim() - 2) + _pad_back(cols, t.shape[1], width)) for t in outs])
    order = rows_in_order(groups)
    return [torch.cat(outs)[order] for outs in zip(*parts)]


def _pad_back(cols: slice, kept: int, width: int) -> tuple[int, int]:
    """(left, right) zeros that put `kept` trimmed columns back at their place in `width`."""
    return (width - kept, 0) if cols.start is not None and cols.start < 0 else (0, width - kept)


def positions_from_mask(attention_mask: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
    """Position ids (B, L) counting real tokens only: the first real token of a row gets `start`.

    Works for left and right padding; pads get a harmless clamped position.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + start


def forward_with_mask(
    model: PreTrainedModel,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
    **kwargs,
):
    """Run `model` under a boolean mask (B, 1, Lq, Lk): the single boundary where it becomes additive.

    Lk = cached length + Lq. Returns the model's output (logits (B, Lq, V), `.cache`, ...).
    """
    dtype = model.dtype if inputs_embeds is None else inputs_embeds.dtype
    if not dtype.is_floating_point:  # quantised models report an integer storage dtype
        dtype = torch.float32
    return model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=to_additive(mask, dtype),
        position_ids=position_ids,
        cache=cache,
        **kwargs,
    )


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """RoPE inverse frequencies (hd/2,) of the model's rotary embedding: a Llama's `model.model.rotary_emb`
    directly, else the first module with `inv_freq` (walking every module costs about 2 ms a call on the pocket
    model, a tenth of making its prefix)."""
    inv = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "inv_freq", None)
    if isinstance(inv, torch.Tensor):
        return inv
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            return inv
    raise ValueError("model has no rotary embedding (no module with `inv_freq`): is it Llama-shaped?")


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE keys by `delta` positions per row (negative moves them back).

    keys: (B, H, T, hd); delta: (B,) ; inv_freq: (hd/2,). Uses HF's rotate_half layout.
    The angle is computed in float64 so re-rotation adds no error of its own; the rotation itself runs in
    float32, or in float64 for float64 keys (where the canonical prefix must then match to rounding).
    """
    angles = delta.double()[:, None] * inv_freq.double()[None, :]  # (B, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # (B, 1, 1, hd)
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    cos, sin = emb.cos().to(work), emb.sin().to(work)
    k = keys.to(work)
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


class Float64Rope(torch.nn.Module):
    """A model's rotary embedding with its angles (position x inv_freq) computed in float64.

    transformers' Llama multiplies `position_ids.float() * inv_freq.float()` in float32 whatever the model's
    dtype, so every angle carries a float32 error of about 6e-8 x angle. RoPE's identity "the score depends only
    on the distance" then holds only to that error: a float64 SmolLM2 (30 layers) stays 1e-5 to 3e-5 away from
    itself when shifted by 7 positions, and from exact gist caching, however `rotate_keys` computes. With the
    angles in float64 both fall to float64 rounding (about 1e-13). In float32 it changes nothing measurable.
    """

    def __init__(self, rope: torch.nn.Module):
        super().__init__()
        kind = str(getattr(rope, "rope_type", "default"))
        if "dynamic" in kind or "longrope" in kind:  # their forward rewrites inv_freq with the sequence length
            raise ValueError(f"Float64Rope supports RoPE with fixed inverse frequencies, not {kind!r}")
        self.rope = rope

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, d), read for its dtype and device only; position_ids: (B, L) -> cos, sin: (B, L, hd)."""
        freqs = position_ids[..., None].double() * self.rope.inv_freq.to(x.device, torch.float64)  # (B, L, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, hd), HF's rotate_half layout
        scale = self.rope.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def rope_angles_in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap every rotary embedding of `model` (a module with `inv_freq` named `rotary_emb`) in `Float64Rope`,
    in place (a second call changes nothing); returns `model`. For float64 checks of exactness (see `Float64Rope`)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] == "rotary_emb" and isinstance(getattr(module, "inv_freq", None), torch.Tensor)
    ]
    if not found and not any(isinstance(m, Float64Rope) for m in model.modules()):
        raise ValueError("model has no `rotary_emb` module with `inv_freq`: is it Llama-shaped?")
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, Float64Rope(module))
    return model


def gist_positions(input_ids: torch.Tensor, gist_token_ids, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, k) positions of the gist tokens, checked row by row.

    With several gist ids `[G_1..G_k]` every row must hold exactly those k tokens, in that order, next
    to each other; with one id (a repeated `<GIST>`) every row the same number k >= 1 of them. No gist
    token may sit on padding (attention_mask 0). Otherwise `ValueError` naming the row(s) and the fault.
    """
    ids = [int(gist_token_ids)] if isinstance(gist_token_ids, int) else [int(i) for i in gist_token_ids]
    first, last, has = gist_span(input_ids, ids)  # raises on a row whose gists are not contiguous
    if not bool(has.all()):
        rows = (~has).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no gist tokens: a prefix needs [demos][G_1..G_k] in every row")
    counts = last - first + 1
    if len(ids) > 1:
        wrong = (counts != len(ids)).nonzero().flatten().tolist()
        if wrong:
            held = ", ".join(f"row {r} holds {int(counts[r])}" for r in wrong)
            raise ValueError(f"every row needs all k={len(ids)} gist tokens {ids}: {held}")
    elif not bool((counts == counts[0]).all()):
        raise ValueError(f"rows hold different numbers of gist tokens {counts.tolist()}: use the same k for all")
    index = first[:, None] + torch.arange(int(counts[0]), device=input_ids.device)[None, :]  # (B, k)
    if len(ids) > 1:
        found = input_ids.gather(1, index)  # (B, k)
        expected = torch.tensor(ids, dtype=found.dtype, device=found.device)
        wrong = (found != expected).any(1).nonzero().flatten().tolist()
        if wrong:
            rows = ", ".join(f"row {r} has {found[r].tolist()}" for r in wrong)
            raise ValueError(f"gist tokens out of order, expected {ids}: {rows}")
    on_pad = (attention_mask.gather(1, index) == 0).any(1).nonzero().flatten().tolist()
    if on_pad:
        raise ValueError(f"gist tokens fall on padding (attention_mask is 0 there) in row(s) {on_pad}")
    return index


def gather_gist_kv(cache_layers, gist_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-layer (keys, values), each (B, H, L, hd), at `gist_index` (B, k) -> two (n, B, H, k, hd)."""
    idx = gist_index[:, None, :, None]
    keys, values = [], []
    for k, v in cache_layers:
        gi = idx.expand(-1, k.shape[1], -1, k.shape[-1])
        keys.append(k.gather(2, gi))
        values.append(v.gather(2, gi))
    return torch.stack(keys), torch.stack(values)


def gists_come_last(gist_index: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """True when in every row the last gist token is the last real token (no query tokens follow the gists).

    gist_index: (B, k) gist positions (`gist_positions`); attention_mask: (B, L). Then, over the real
    tokens, the gist mask *is* the causal mask: nothing comes after the gists for the rule to hide.
    """
    L = attention_mask.shape[1]
    pos = torch.arange(L, device=attention_mask.device)
    last_real = torch.where(attention_mask.bool(), pos, -1).amax(1)  # (B,)
    return bool((gist_index[:, -1] == last_real).all())


def prefix_pass(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gist_token_ids: int | Iterable[int],
    gist_index: torch.Tensor,
    position_ids: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs,
):
    """The one forward pass that makes a prefix over `[demos][gists]` rows (B, L); returns the model's output.

    Where no row has padding and the gists come last (`gists_come_last`), the gist mask equals the causal
    mask, so the pass gets no mask at all and attention takes sdpa's fast causal path (`is_causal`); any
    other batch runs under the explicit gist mask. Both give the same gist K/V (tested).
    `gist_index` (B, k) from `gist_positions`; `kwargs` go to the model (cache, gist capture, ...).
    """
    tokens = None if inputs_embeds is not None else input_ids
    if bool(attention_mask.bool().all()) and gists_come_last(gist_index, attention_mask):
        return model(
            input_ids=tokens, inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids, **kwargs
        )
    mask = make_gist_mask(input_ids, gist_token_ids, attention_mask=attention_mask)
    return forward_with_mask(model, mask, position_ids, input_ids=tokens, inputs_embeds=inputs_embeds, **kwargs)


def extract_prefix(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gist_token_ids: int | Iterable[int],
    inputs_embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Prefix:
    """Canonical prefix from one forward pass over `[demos][gists]` rows (left or right padded).

    input_ids, attention_mask: (B, L). Tokens after the gists, if any, are ignored (the gist mask
    keeps the gists from seeing them). `inputs_embeds` (B, L, d), if given, replaces the embedding
    lookup (HyperLlama's separate gist table). `position_ids` (B, L) default to counting real
    tokens from 0; any other offset gives the same prefix. Returns a Prefix (n, B, H_kv, k, hd).
    Rows are checked first (`gist_positions`): all k gist tokens, in order, contiguous, none on padding.
    Unpadded rows ending in their gists take the fast causal path (`prefix_pass`).
    """
    index = gist_positions(input_ids, gist_token_ids, attention_mask)  # (B, k), checked before the pass
    positions = positions_from_mask(attention_mask) if position_ids is None else position_ids
    out = prefix_pass(
        model,
        input_ids,
        attention_mask,
        gist_token_ids,
        index,
        positions,
        inputs_embeds=inputs_embeds,
        cache=DynamicCache(config=model.config),
        use_cache=True,
        logits_to_keep=1,
    )
    layers = [(layer.keys, layer.values) for layer in out.cache.layers]
    keys, values = gather_gist_kv(layers, index)  # (n, B, H, k, hd)
    return canonical_prefix(model, keys, values, positions.gather(1, index[:, :1]).squeeze(1))


def canonical_prefix(model: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor, offset: torch.Tensor) -> Prefix:
    """Gist keys (n, B, H, k, hd) rotated at positions offset..offset+k-1 -> a Prefix at 0..k-1.

    offset: (B,) absolute position of G_1 in each row. Values carry no position and stay as they are.
    """
    inv_freq = rope_inv_freq(model)
    return Prefix(torch.stack([rotate_keys(k, -offset, inv_freq) for k in keys]), values)


def prefixed_causal_mask(past_real: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask (B, 1, L, P + L) for L new tokens after P cached ones.

    past_real: (B, P) bool, True where a cached key is real (a prefix is all True).
    attention_mask: (B, L) for the new tokens. New tokens see every real cached key, earlier real
    new tokens (causal), and always themselves. Prefix k=2, one left pad, L=3::

        key   P P _ a b
        _     . . x . .
        a     x x . x .
        b     x x . x x
    """
    B, L = attention_mask.shape
    pos = torch.arange(L, device=attention_mask.device)
    causal = (pos[None, :] <= pos[:, None])[None] & attention_mask.bool()[:, None, :]  # (B, L, L)
    causal = causal | torch.eye(L, dtype=torch.bool, device=attention_mask.device)
    past = past_real.bool()[:, None, :].expand(B, L, -1)  # (B, L, P)
    return torch.cat([past, causal], dim=-1)[:, None]


def forward_with_prefix(
    model: PreTrainedModel,
    prefix: Prefix,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **kwargs,
):
    """Run the downstream model on (B, L) tokens after a (n, B, H, k, hd) prefix.

    Tokens run at positions k, k+1, ... (counting real tokens only, so left or right padding both
    work). Returns the model output; `.logits` is (B, L, V).
    """
    k = prefix.num_virtual_tokens
    past_real = torch.ones(input_ids.shape[0], k, dtype=torch.bool, device=input_ids.device)
    mask = prefixed_causal_mask(past_real, attention_mask)
    return forward_with_mask(
        model,
        mask,
        positions_from_mask(attention_mask, start=k),
        input_ids=input_ids,
        cache=prefix.to_cache(model.config),
        **kwargs,
    )


def _to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Move every row's real tokens to the right end (generation appends at the end)."""
    B, L = input_ids.shape
    lengths = attention_mask.long().sum(1)  # (B,)
    src = torch.arange(L, device=input_ids.device)[None, :] - (L - lengths)[:, None]  # (B, L)
    start = (attention_mask.long().argmax(1))[:, None]  # first real token (right padding: 0)
    valid = src >= 0
    gathered = input_ids.gather(1, (src + start).clamp(0, L - 1))
    return torch.where(valid, gathered, pad_id), valid.long()


@torch.no_grad()
def generate_with_prefix(
    model: PreTrainedModel,
    prefix: Prefix | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Greedy decoding for a batch of prompts, each after its own prefix (rows may be different tasks).

    input_ids, attention_mask: (B, L), any padding side (rows must hold contiguous real tokens).
    `prefix=None` runs without a prefix. eos_token_id: one id or several (any of them ends a row).
    Returns the new token ids of each row, cut after its first stop token.
    """
    stops = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=input_ids.device)
    ids, am = _to_left_padding(input_ids, attention_mask, pad_token_id)
    B = ids.shape[0]
    k = prefix.num_virtual_tokens if prefix is not None else 0
    cache = prefix.to_cache(model.config) if prefix is not None else DynamicCache(config=model.config)
    past_real = torch.ones(B, k, dtype=torch.bool, device=ids.device)
    step_ids, step_mask, start = ids, am, torch.full((B,), k, device=ids.device)
    out_tokens = torch.empty(B, 0, dtype=torch.long, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        mask = prefixed_causal_mask(past_real, step_mask)
        out = forward_with_mask(
            model,
            mask,
            positions_from_mask(step_mask, start=start[:, None]),
            input_ids=step_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache
        past_real = torch.cat([past_real, step_mask.bool()], dim=1)
        start = start + step_mask.long().sum(1)
        token = out.logits[:, -1].argmax(-1)  # (B,)
        token = torch.where(done, pad_token_id, token)
        out_tokens = torch.cat([out_tokens, token[:, None]], dim=1)
        if stops:
            done = done | torch.isin(token, stop_ids)
            if bool(done.all()):
                break
        step_ids, step_mask = token[:, None], torch.ones(B, 1, dtype=torch.long, device=ids.device)
    return [_cut_after_stop(row, set(stops)) for row in out_tokens.tolist()]


def _cut_after_stop(tokens: list[int], stops: set[int]) -> list[int]:
    first = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens if first is None else tokens[: first + 1]


# --- PEFT prefix-tuning format -------------------------------------------------------------------


def peft_wrap(model, config):
    """`peft.get_peft_model(model, config)` without the FutureWarning it triggers under transformers 5.

    peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates ("use
    is_activation_checkpointing"); gistlib never switches checkpointing through peft, so the warning only
    alarms learners (a red box in every lesson). Filtered here, at its one source, by its precise message."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def lora_layers(model: nn.Module) -> list:
    """Every PEFT LoRA layer inside `model`, in module order (walk once and keep the list: a walk costs about a
    millisecond per call on the pocket model)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_switched_off(layers: list):
    """Context manager: each LoRA layer in `layers` calls only its base layer inside, as under PEFT's
    `disable_adapter()`, and gets back the state it had (so it nests).

    PEFT's own switch walks the whole model twice per call to read and set its status; with the layers found
    once, a pocket HyperLlama step (three switches) ran 2.4% faster (docs/research_log.md)."""
    found = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, off in zip(layers, found):
            m._disable_adapters = off


def prefix_to_peft(prefix: Prefix, row: int = 0) -> torch.Tensor:
    """One row as PEFT's prompt embedding: (k, n_layers * 2 * H_kv * hd).

    Per virtual token the layout is [layer][key, value][kv_head][head_dim], the order PEFT's
    `get_prompt` unpacks (`view(B, k, n*2, H, hd).permute(2, 0, 3, 1, 4)`).
    """
    kv = torch.stack([prefix.keys[:, row], prefix.values[:, row]], dim=1)  # (n, 2, H, k, hd)
    return kv.permute(3, 0, 1, 2, 4).reshape(prefix.num_virtual_tokens, -1)


def prefix_from_peft(embedding: torch.Tensor, num_layers: int, num_kv_heads: int) -> Prefix:
    """Inverse of `prefix_to_peft`: (k, n * 2 * H * hd) -> Prefix with batch 1."""
    k = embedding.shape[0]
    kv = embedding.reshape(k, num_layers, 2, num_kv_heads, -1).permute(1, 2, 3, 0, 4)  # (n, 2, H, k, hd)
    return Prefix(kv[:, 0].unsqueeze(1), kv[:, 1].unsqueeze(1))


def peft_model_with_prefix(model: PreTrainedModel, prefix: Prefix, row: int = 0):
    """A PEFT prefix-tuning model over `model` whose prompt embedding holds one row of `prefix`.

    Ready to be tuned further with PEFT (the prefix is its trainable parameter); `model`'s own
    weights are shared, not copied.
    """
    from peft import PrefixTuningConfig, TaskType

    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prefix.num_virtual_tokens)
    peft_model = peft_wrap(model, cfg)
    embedding = peft_model.prompt_encoder["default"].embedding
    flat = prefix_to_peft(prefix, row)
    if embedding.weight.shape != flat.shape:
        raise ValueError(f"PEFT expects a prompt embedding {tuple(embedding.weight.shape)}, got {tuple(flat.shape)}")
    with torch.no_grad():
        embedding.weight.copy_(flat)
    return peft_model
