"""The query cost model against torch's own FLOP counter on a real forward pass over a cache."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from gistlib.models.flops import flops_bound, query_flops
from gistlib.models.smol import smol_shaped_config
from gistlib.models.tiny import build_tiny_llama


def counted_flops(model, context: int, q: int) -> int:
    """FLOPs torch counts for a q-token forward after a `context`-token cache (eager attention: plain matmuls)."""
    ids = torch.randint(3, model.config.vocab_size, (1, context + q))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids[:, context:], past_key_values=cache, use_cache=True)
    return counter.get_total_flops()


def test_query_flops_match_torchs_count():
    model = build_tiny_llama(
        attn_implementation="eager", num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96
    )
    for context, q in ((5, 1), (17, 4), (40, 8)):
        assert query_flops(model.config, context, q)["total"] == counted_flops(model, context, q), (context, q)


def test_the_bound_grows_with_the_cache_and_is_small_at_smollm2_size():
    cfg = smol_shaped_config()
    assert 1 < flops_bound(cfg, 256, 16, 8) < flops_bound(cfg, 1024, 16, 8) < 1.5
