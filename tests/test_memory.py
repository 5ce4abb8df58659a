"""gistlib.models.memory: exact parameter counts, nf4 bytes against a loaded model, estimate vs measured step peak."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from gistlib.models import memory
from gistlib.models.memory import (
    LLAMA2_7B,
    LLAMA2_13B,
    GiB,
    ModelShape,
    TensorMemoryTracker,
    estimate_memory,
    lora_params,
    measure_base_lora_step,
    planner_table,
    weight_bytes,
)
from gistlib.models.tiny import build_tiny_llama, count_parameters

# Measured peaks need the estimate within this factor either way (measured ratios: 1.01 to 1.13).
AGREEMENT_FACTOR = 1.25


def test_llama2_presets_have_the_published_parameter_counts():
    assert LLAMA2_7B.num_parameters() == 6_738_415_616
    assert LLAMA2_13B.num_parameters() == 13_015_864_320
    assert lora_params(LLAMA2_7B, 8) == 19_988_480  # peft's count for r8 on all 7 linears


def test_from_config_and_lora_count_match_real_models():
    from peft import LoraConfig

    from gistlib.core.prefix import peft_wrap

    model = build_tiny_llama(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96)
    shape = ModelShape.from_config(model.config)
    assert (shape.kv_heads, shape.kv_dim, shape.layers) == (2, 32, 3)
    assert shape.num_parameters() == count_parameters(model)
    peft_model = peft_wrap(model, LoraConfig(r=4, target_modules=list(memory.LORA_TARGETS)))
    assert lora_params(shape, 4) == count_parameters(peft_model, trainable_only=True)


def test_nf4_weight_bytes_match_a_loaded_4bit_model(tmp_path):
    from gistlib.models.loading import load_llama

    build_tiny_llama(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2).save_pretrained(
        tmp_path
    )
    model = load_llama(tmp_path, quantization="nf4", gradient_checkpointing=False)
    measured = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            measured += module.weight.numel() * module.weight.element_size()
            measured += qs.absmax.numel() * qs.absmax.element_size() + qs.state2.absmax.numel() * 4
    unquantized = sum(p.numel() * p.element_size() for p in model.parameters() if p.__class__.__name__ != "Params4bit")
    shape = ModelShape.from_config(model.config)
    assert memory.linear_weight_bytes(shape, "nf4") == pytest.approx(measured, rel=0.01)
    assert weight_bytes(shape, "nf4") == pytest.approx(measured + unquantized, rel=0.01)  # fp32 embeddings/norms
    assert weight_bytes(shape, "nf4") < weight_bytes(shape, "int8") < weight_bytes(shape, None, dtype_bytes=4)


def test_tracker_counts_new_storages_not_views_and_forgets_freed():
    def work():
        a = torch.zeros(1000)  # 4000 bytes
        b = a[10:].view(-1, 2)  # a view: no new storage
        c = torch.ones(500)  # 2000 bytes, live with a
        del a, b, c
        torch.ones(250)  # 1000 bytes after the others are freed

    with TensorMemoryTracker() as tracker:
        work()
    assert tracker.peak == 6000
    assert tracker.current <= 1000


@pytest.mark.parametrize(
    "shape, batch, seq, checkpointing",
    [
        (ModelShape(128, 4, 4, 4, 512, 512, name="activations"), 8, 128, False),
        (ModelShape(128, 4, 4, 4, 512, 512, name="activations, ckpt"), 8, 128, True),
        (ModelShape(64, 2, 4, 4, 256, 4096, name="logits"), 4, 64, False),
    ],
    ids=lambda x: getattr(x, "name", None),
)
def test_estimate_agrees_with_measured_base_lora_step(shape, batch, seq, checkpointing):
    """Float32 'base LoRA step' (plain LM loss, not yet the HyperLlama step) on the CPU."""
    r = measure_base_lora_step(shape, batch, seq, lora_rank=8, gradient_checkpointing=checkpointing)
    print(
        f"{shape.name}: measured {r['measured'] / 2**20:.2f} MiB, estimated {r['estimated'] / 2**20:.2f} MiB; "
        f"step allocations measured {r['measured_step_alloc'] / 2**20:.2f}, "
        f"estimated {r['estimated_activations_and_grads'] / 2**20:.2f} MiB"
    )
    assert r["estimated_params"] == r["measured_params"]
    for est, got in [
        (r["estimated"], r["measured"]),
        (r["estimated_activations_and_grads"], r["measured_step_alloc"]),
    ]:
        assert 1 / AGREEMENT_FACTOR < est / got < AGREEMENT_FACTOR


def test_estimate_terms_move_the_right_way():
    base = estimate_memory(LLAMA2_7B)
    assert estimate_memory(LLAMA2_7B, batch_size=8).activations > base.activations
    assert estimate_memory(LLAMA2_7B, hyper_len=2048).activations > base.activations
    assert estimate_memory(LLAMA2_7B, gradient_checkpointing=False).activations > 5 * base.activations
    assert estimate_memory(LLAMA2_7B, activation_bytes=2).activations == pytest.approx(base.activations / 2, rel=0.1)
    assert estimate_memory(LLAMA2_7B, lora_rank=16).optimizer == pytest.approx(2 * base.optimizer, rel=0.01)
    assert estimate_memory(LLAMA2_13B).total > base.total
    # nf4 7B weights: 3.34 GB of 4-bit linears + 1.05 GB of fp32 embeddings/lm_head
    assert 4.0 < base.weights / GiB < 4.2


def test_planner_table_lists_models_settings_and_cards():
    table = planner_table([LLAMA2_7B, LLAMA2_13B], cards_gb=(8, 12, 16, 24))
    lines = table.splitlines()
    assert "| 8 GB | 12 GB | 16 GB | 24 GB |" in lines[0]
    rows = lines[2:]
    assert len(rows) == 2 * len(memory.DEFAULT_SETTINGS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        total = float(cells[5])
        assert cells[6:] == ["yes" if total <= gb else "no" for gb in (8, 12, 16, 24)]
    no_ckpt_13b = next(r for r in rows if "13B" in r and "no ckpt" in r)
    assert no_ckpt_13b.rstrip(" |").endswith("no")


def test_module_entry_prints_the_table(capsys):
    memory.main([])
    out = capsys.readouterr().out
    assert "Llama-2-7B" in out and "Llama-2-13B" in out and "24 GB" in out


def test_hyperllama_estimate_agrees_with_a_two_pass_emulation():
    """The HyperLlama step without checkpointing, emulated with a KV cache (float32, CPU): a LoRA pass
    over B x T_h tokens under a 4-D mask, its last k keys/values as a prefix, a downstream pass with the
    adapters off and an LM loss, backward through both, AdamW. (No gist embeddings or re-rotation:
    memory-neutral; gist parameters are subtracted from the estimate.)"""
    from peft import LoraConfig
    from transformers import DynamicCache

    from gistlib.core.prefix import peft_wrap

    shape, batch, hyper_len, down_len, k = ModelShape(128, 4, 4, 4, 512, 512), 8, 96, 48, 8
    base = build_tiny_llama(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=512)
    model = peft_wrap(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(memory.LORA_TARGETS))).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    hyper_ids = torch.randint(0, 512, (batch, hyper_len), generator=gen)
    down_ids = torch.randint(0, 512, (batch, down_len), generator=gen)
    neg = torch.finfo(torch.float32).min
    causal = torch.ones(hyper_len, hyper_len, dtype=torch.bool).tril()
    behind_prefix = torch.ones(down_len, k + down_len, dtype=torch.bool).tril(k)

    def step():
        optimizer.zero_grad(set_to_none=True)
        hyper_mask = torch.zeros(batch, 1, hyper_len, hyper_len).masked_fill(~causal, neg)
        out = model(input_ids=hyper_ids, attention_mask=hyper_mask, cache=DynamicCache(config=base.config))
        prefix = DynamicCache(
            [(lay.keys[:, :, -k:], lay.values[:, :, -k:]) for lay in out.cache.layers], config=base.config
        )
        down_mask = torch.zeros(batch, 1, down_len, k + down_len).masked_fill(~behind_prefix, neg)
        with model.disable_adapter():
            positions = torch.arange(k, k + down_len).expand(batch, -1)
            loss = model(
                input_ids=down_ids,
                attention_mask=down_mask,
                cache=prefix,
                position_ids=positions,
                labels=down_ids,
            ).loss
        loss.backward()
        optimizer.step()

    step()
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    measured = (
        memory.tensor_bytes(list(model.parameters())) + memory.tensor_bytes(states) + memory.measure_peak_bytes(step)
    )
    est = estimate_memory(
        shape, quantization=None, lora_rank=8, num_gist_tokens=k, batch_size=batch, hyper_len=hyper_len,
        down_len=down_len, gradient_checkpointing=False, dtype_bytes=4, runtime_overhead_bytes=0,
    )  # fmt: skip
    estimated = est.total - 16 * k * shape.hidden  # no gist embeddings here (4 + 4 + 8 bytes each)
    print(f"HyperLlama emulation: measured {measured / 2**20:.2f} MiB, estimated {estimated / 2**20:.2f} MiB")
    assert 1 / AGREEMENT_FACTOR < estimated / measured < AGREEMENT_FACTOR
