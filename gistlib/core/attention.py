"""Prefix injection and gist K/V capture inside attention, so training works with checkpointing on.

Under gradient checkpointing transformers drops the KV cache (`cache=None` in every checkpointed
layer), so a prefix cannot reach the downstream model as a cache, and the hypernetwork's gist K/V
cannot be read back from one. Instead gistlib registers two attention functions, `gistlib_sdpa` and
`gistlib_eager`, that wrap transformers' own and look at two keyword arguments passed to the model:

- `gist_prefix=(keys, values)`, each (n_layers, B, H_kv, k, hd): layer `i` prepends them to its
  keys and values (the mask must then cover k + L keys, as `prefixed_causal_mask` builds it);
- `gist_capture=(store, index)`: layer `i` writes its keys and values at `index` (B, k) positions
  into `store[i]` as (B, H_kv, k, hd), rotated at their absolute positions (after RoPE).

Without those arguments they are exactly sdpa / eager. The arguments flow through the checkpointed
layers as ordinary kwargs, and gradients flow through them (non-reentrant checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

__all__ = ["use_gistlib_attention", "GISTLIB_PREFIX"]

GISTLIB_PREFIX = "gistlib_"


def _wrap(inner: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, gist_prefix=None, gist_capture=None, **kwargs):
        layer = module.layer_idx
        if gist_capture is not None:
            store, index = gist_capture  # index: (B, k)
            gi = index[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
            store[layer] = (key.gather(2, gi), value.gather(2, gi))  # (B, H, k, hd) each
        if gist_prefix is not None:
            keys, values = gist_prefix  # (n, B, H, k, hd)
            key = torch.cat([keys[layer].to(key.dtype), key], dim=2)  # (B, H, k + L, hd)
            value = torch.cat([values[layer].to(value.dtype), value], dim=2)
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


AttentionInterface.register(GISTLIB_PREFIX + "sdpa", _wrap(sdpa_attention_forward))
AttentionInterface.register(GISTLIB_PREFIX + "eager", _wrap(eager_attention_forward))


def use_gistlib_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch `model` (in place) to the gistlib wrapper of its current attention (sdpa or eager)."""
    current = model.config._attn_implementation or "sdpa"
    if current.startswith(GISTLIB_PREFIX):
        return model
    if current not in ("sdpa", "eager"):
        raise ValueError(
            f"gistlib wraps sdpa or eager attention, this model uses {current!r}: "
            "load it with attn_implementation='sdpa'"
        )
    model.set_attn_implementation(GISTLIB_PREFIX + current)
    return model
