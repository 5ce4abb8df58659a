"""The arithmetic of one query: how much of a forward pass attention over the context is, and so how much
a short prefix can save against a long prompt cache at best.

A query of q tokens after a context of c cached tokens (a k-token gist prefix, or an n-token prompt cache)
costs, in multiply-adds x 2 (FLOPs), with d = hidden, L = layers, H / H_kv heads of size hd, f = MLP width,
V = vocabulary and logits on every query token (attention as kernels compute it: every query token against
every key of the call, the causal mask applied to the scores):

    dense      = 2 q (L (2 d H hd + 2 d H_kv hd + 3 d f) + V d)       the same for both
    attention  = 4 L H hd q (c + q)                                   scores QK^T and the weighted sum AV

Only `attention` depends on c, so the gist/cache speed-up per query is at most
(dense + attention(n)) / (dense + attention(k)) in FLOPs: on a 135M-parameter model dense work is most of a
query, and n = 1024 demo tokens can make a query only ~1.3x cheaper (benchmarks/gist_vs_cache.py prints
this bound beside the measured times). Norms, RoPE, softmax and activations are left out (O(q d), O(q c H)).
"""

from __future__ import annotations

__all__ = ["query_flops", "flops_bound"]


def query_flops(config, context: int, q: int) -> dict[str, int]:
    """FLOPs of one q-token query (B = 1) over `context` cached tokens of a Llama `config`: dense, attention, total."""
    d, L, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // H
    kv = config.num_key_value_heads
    linear = L * (2 * d * H * hd + 2 * d * kv * hd + 3 * d * config.intermediate_size)
    dense = 2 * q * (linear + config.vocab_size * d)
    attention = 4 * L * H * hd * q * (context + q)
    return {"dense": dense, "attention": attention, "total": dense + attention}


def flops_bound(config, n: int, k: int, q: int) -> float:
    """The most a k-token prefix can speed up a q-token query against an n-token cache, counting FLOPs."""
    return query_flops(config, n, q)["total"] / query_flops(config, k, q)["total"]
