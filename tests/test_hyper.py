"""HyperLlama: frozen base, gradient routing, zero-init equivalence, both K/V paths, checkpointing, 4-bit, saving."""

import pytest
import torch
from conftest import GIST_IDS, PAD

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.prefix import extract_prefix, forward_with_prefix
from gistlib.models.tiny import build_tiny_llama

K = len(GIST_IDS)


def make_hyper(seed=0, **cfg) -> HyperLlama:
    base = build_tiny_llama(vocab_size=64, seed=seed)
    return HyperLlama(base, GIST_IDS, HyperConfig(num_gist_tokens=K, **cfg))


def toy_batch(seed=0, tasks=3, queries=2):
    """Hypernetwork rows [BOS] demos G.. (left padded) and downstream rows with labels on the last 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    hyper = [
        [1] + torch.randint(3, 56, (int(n),), generator=g).tolist() + GIST_IDS
        for n in torch.randint(4, 12, (tasks,), generator=g)
    ]
    Lh = max(map(len, hyper))
    h_ids = torch.tensor([[PAD] * (Lh - len(r)) + r for r in hyper])
    h_am = (h_ids != PAD).long()
    down = torch.randint(3, 56, (tasks * queries, 6), generator=g)
    down[:, 0] = 1
    labels = torch.full_like(down, -100)
    labels[:, -2:] = down[:, -2:]
    task_index = torch.arange(tasks).repeat_interleave(queries)
    return h_ids, h_am, down, torch.ones_like(down), labels, task_index


def toy_teacher(batch, rows=(0, 3, 5)):
    """Teacher rows `[BOS] demos query answer` for some downstream rows of `toy_batch` (right padded)."""
    h_ids, _, down, *_, task_index = batch
    teacher = []
    for r in rows:
        demos = [t for t in h_ids[task_index[r]].tolist() if t not in (PAD, 1, *GIST_IDS)]
        teacher.append([1, *demos, *down[r, 1:].tolist()])
    width = max(map(len, teacher))
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in teacher])
    return {"icl_input_ids": ids, "icl_attention_mask": (ids != PAD).long(), "icl_rows": torch.tensor(rows)}


def perturb_lora(hyper: HyperLlama, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hyper.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def base_state(hyper: HyperLlama) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in hyper.base.named_parameters() if "lora_" not in n}


def test_training_step_leaves_base_bit_identical_and_routes_gradients():
    hyper = make_hyper(prefix_head="linear")
    before = base_state(hyper)
    trainable = hyper.trainable_state()
    assert set(trainable) and all(
        ("lora_" in n) or n == "gist_embeddings" or n.startswith("prefix_head.") for n in trainable
    )
    assert any(n.startswith("prefix_head.") for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    h_ids, h_am, ids, am, labels, ti = toy_batch()
    hyper.train()
    loss = hyper(h_ids, h_am, ids, am, labels, ti)
    loss.backward()
    with_grad = {n for n, p in hyper.named_parameters() if p.grad is not None}
    assert with_grad <= set(trainable)
    assert hyper.gist_embeddings.grad.abs().sum() > 0
    # every LoRA B gets a gradient, except in the last layer's q/o/MLP maps: the prefix is that layer's
    # K/V, computed before its attention output and MLP, so those adapters cannot matter (true in the paper too)
    last = f"layers.{hyper.base.config.num_hidden_layers - 1}."
    for n in trainable:
        if "lora_B" in n:
            dead = last in n and not any(m in n for m in ("k_proj", "v_proj"))
            assert (hyper.get_parameter(n).grad is None) == dead, n
    opt.step()
    after = base_state(hyper)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not torch.equal(trainable["gist_embeddings"], before.get("gist_embeddings", torch.zeros(1)))


def test_zero_initialised_adapters_give_the_base_models_gist_prefix():
    """Fresh LoRA (B = 0), identity head, gist table = the gist ids' rows: the base model's own prefix."""
    hyper = make_hyper(gist_init="gist_tokens")
    reference = build_tiny_llama(vocab_size=64, seed=0)  # an untouched copy: independent reference
    h_ids, h_am, *_ = toy_batch()
    ours = hyper.make_prefix(h_ids, h_am)
    theirs = extract_prefix(reference, h_ids, h_am, GIST_IDS)
    assert (ours.keys - theirs.keys).abs().max() < 1e-5 and (ours.values - theirs.values).abs().max() < 1e-5


def test_capture_path_equals_cache_path_with_trained_adapters():
    hyper = make_hyper()
    perturb_lora(hyper)
    h_ids, h_am, ids, am, _, ti = toy_batch()
    ours = hyper.make_prefix(h_ids, h_am)
    theirs = extract_prefix(hyper.peft, h_ids, h_am, GIST_IDS, inputs_embeds=hyper.hyper_embeddings(h_ids))
    assert (ours.keys - theirs.keys).abs().max() < 1e-5
    # the adapters matter: the base alone gives another prefix
    with hyper.downstream_mode():
        plain = extract_prefix(hyper.peft, h_ids, h_am, GIST_IDS, inputs_embeds=hyper.hyper_embeddings(h_ids))
    assert (ours.keys - plain.keys).abs().max() > 1e-3
    # downstream: attention-kwarg path equals the cache path, adapters off
    prefix = ours.rows(ti)
    with hyper.downstream_mode():
        cached = forward_with_prefix(hyper.peft, prefix, ids, am).logits
    assert (hyper.downstream_logits(prefix, ids, am) - cached).abs().max() < 1e-5


def test_downstream_mode_is_the_untouched_base_and_nests():
    """Inside downstream_mode() the trained hypernetwork's base gives the logits of a base never wrapped in LoRA
    (and of PEFT's own `disable_adapter()`); nested, the inner exit leaves the adapters off; outside, they are on."""
    hyper = make_hyper()
    perturb_lora(hyper)
    *_, ids, am, _, _ = toy_batch()
    plain = build_tiny_llama(vocab_size=64, seed=0).eval()  # make_hyper's base, never wrapped
    with torch.no_grad():
        reference = plain(input_ids=ids, attention_mask=am).logits
        with_lora = hyper.peft(input_ids=ids, attention_mask=am).logits
        with hyper.peft.disable_adapter():
            peft_off = hyper.peft(input_ids=ids, attention_mask=am).logits
        with hyper.downstream_mode():
            with hyper.downstream_mode():
                pass
            assert hyper.adapters_off
            ours = hyper.peft(input_ids=ids, attention_mask=am).logits
    assert not hyper.adapters_off
    assert (ours - reference).abs().max() < 1e-6 and torch.equal(ours, peft_off)
    assert (with_lora - reference).abs().max() > 1e-3  # the LoRA weights matter outside


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_phase_backward_equals_plain_backward(checkpointing, teacher):
    """`loss_and_backward` (with or without checkpointing, with or without ICL-distillation teacher rows)
    gives the gradients of `forward().backward()`."""
    grads, losses = [], []
    extra = {"distill_weight": 2.0, **toy_teacher(toy_batch())} if teacher else {}
    for two_phase in (False, True):
        hyper = make_hyper()
        perturb_lora(hyper)
        hyper.train()
        if two_phase and checkpointing:
            hyper.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if two_phase:
            loss = hyper.loss_and_backward(*toy_batch(), loss_scale=0.5, **extra)
        else:
            loss = hyper(*toy_batch(), **extra)
            (0.5 * loss).backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in hyper.trainable_state().items() if p.grad is not None})
    if teacher:
        with torch.no_grad():
            lm_only = hyper(*toy_batch()).item()
        assert losses[1] == pytest.approx(lm_only, abs=1e-6)  # the two-phase path reports the LM loss alone
        assert losses[0] > lm_only + 1e-3  # the plain path returns LM + 2 x distill
    else:
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys() and "gist_embeddings" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_plain_forward_refuses_checkpointing():
    hyper = make_hyper()
    hyper.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    hyper.train()
    with pytest.raises(RuntimeError, match="loss_and_backward"):
        hyper(*toy_batch())


def test_loss_falls_on_a_tiny_task():
    """A task = one of 4 signal tokens, shown in the demos; the answer is that token. Only the prefix carries it."""
    torch.manual_seed(0)
    # a random base at the default init (std 0.02) barely reacts to any prefix; std 0.1 makes it steerable
    hyper = HyperLlama(build_tiny_llama(vocab_size=64, initializer_range=0.1), GIST_IDS, HyperConfig(num_gist_tokens=K))
    opt = torch.optim.AdamW(hyper.trainable_state().values(), lr=1e-2)
    hyper.train()
    losses = []
    for step in range(40):
        g = torch.Generator().manual_seed(step)
        signal = torch.randint(3, 7, (16, 1), generator=g)
        demos = torch.cat(
            [torch.randint(10, 56, (16, 3), generator=g), signal, torch.randint(10, 56, (16, 2), generator=g)], 1
        )
        h_ids = torch.cat([torch.ones(16, 1, dtype=torch.long), demos, torch.tensor([GIST_IDS] * 16)], 1)
        ids = torch.cat([torch.ones(16, 1, dtype=torch.long), torch.full((16, 1), 8), signal], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        opt.zero_grad()
        loss = hyper.loss_and_backward(h_ids, torch.ones_like(h_ids), ids, torch.ones_like(ids), labels)
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"tiny task loss: first 5 steps {first:.3f}, last 5 steps {last:.3f} (uniform over the 4 answers: 1.386)")
    assert last < 0.5 * first and last < 1.0  # below 1.386: the answer is read from the demos, via the prefix


def test_generate_and_score_use_the_prefix():
    hyper = make_hyper()
    h_ids, h_am, ids, am, labels, ti = toy_batch()
    prefix = hyper.make_prefix(h_ids, h_am).rows(ti)
    lp, n = hyper.score(prefix, ids, am, labels)
    assert lp.shape == (len(ids),) and (n == 2).all() and (lp < 0).all()
    ref = -torch.nn.functional.cross_entropy(
        hyper.downstream_logits(prefix, ids, am)[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"
    ).sum(1)
    torch.testing.assert_close(lp, ref.detach())
    out = hyper.generate(prefix, ids, am, max_new_tokens=3)
    assert len(out) == len(ids) and all(len(o) == 3 for o in out)


def test_save_and_load_round_trip(tmp_path):
    hyper = make_hyper(prefix_head="mlp")
    perturb_lora(hyper)
    with torch.no_grad():
        hyper.gist_embeddings.add_(1.0)
        for p in hyper.prefix_head.parameters():
            p.add_(0.01)
    hyper.save_pretrained(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "hyper.safetensors").exists()
    again = HyperLlama.from_pretrained(build_tiny_llama(vocab_size=64, seed=0), tmp_path)
    h_ids, h_am, *_ = toy_batch()
    a, b = hyper.make_prefix(h_ids, h_am), again.make_prefix(h_ids, h_am)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(FileNotFoundError, match="no HyperLlama"):
        HyperLlama.from_pretrained(build_tiny_llama(vocab_size=64), tmp_path / "nothing")


@pytest.mark.parametrize("field,value", [("prefix_head", "conv"), ("lora_rank", 0), ("gist_init", "zeros")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"HyperConfig.{field}"):
        HyperConfig(**{field: value})


def test_four_bit_base_stays_frozen_and_trains(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build_tiny_llama(vocab_size=64, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, dtype=torch.float32)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    hyper = HyperLlama(base, GIST_IDS, HyperConfig(num_gist_tokens=K))
    before = base_state(hyper)
    quant_before = {n: b.clone() for n, b in hyper.base.named_buffers()}
    opt = torch.optim.AdamW(hyper.trainable_state().values(), lr=1e-2)
    hyper.train()
    loss = hyper(*toy_batch())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert hyper.gist_embeddings.grad.abs().sum() > 0
    after = base_state(hyper)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(quant_before[n], b) for n, b in hyper.base.named_buffers())
    weights = [n for n in before if "q_proj.base_layer.weight" in n]
    assert weights and before[weights[0]].dtype == torch.uint8  # packed 4-bit
    # save the trained hypernetwork and rebuild it over a freshly loaded 4-bit base: same prefixes
    hyper.eval()
    hyper.save_pretrained(tmp_path / "hyper")
    again = HyperLlama.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, dtype=torch.float32),
        tmp_path / "hyper",
    ).eval()
    h_ids, h_am, *_ = toy_batch()
    with torch.no_grad():
        a, b = hyper.make_prefix(h_ids, h_am), again.make_prefix(h_ids, h_am)
    torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


def test_a_prefix_cannot_be_made_with_the_adapters_off():
    """Inside downstream_mode() the base runs without LoRA: a prefix made there would silently be the base's."""
    hyper = make_hyper()
    ids = torch.tensor([[1, 5, 6, *GIST_IDS]])
    hyper.make_prefix(ids, torch.ones_like(ids))
    with hyper.downstream_mode(), pytest.raises(RuntimeError, match="inside downstream_mode"):
        hyper.make_prefix(ids, torch.ones_like(ids))
    assert not hyper.adapters_off


def test_the_merged_copy_is_reused_and_follows_a_change_made_without_gradients():
    """Two inference calls share one merged copy; an in-place LoRA change between them (a load, a step under
    no_grad) makes the next call merge again, so its prefix is the changed hypernetwork's."""
    hyper = make_hyper()
    perturb_lora(hyper, scale=0.2)
    hyper.eval()
    h_ids, h_am, *_ = toy_batch()
    real = h_am[0].bool()
    ids, am = h_ids[:1, real], h_am[:1, real]
    with torch.no_grad():
        first = hyper.make_prefix(ids, am)
        kept = hyper._merged
        hyper.make_prefix(ids, am)
        assert hyper._merged is kept  # reused
        perturb_lora(hyper, scale=0.2, seed=7)
        moved = hyper.make_prefix(ids, am)
        assert hyper._merged is not kept
    reference = hyper.make_prefix(ids, am)  # gradients on: the unmerged LoRA as it is now
    torch.testing.assert_close(moved.keys, reference.keys.detach(), atol=1e-4, rtol=1e-4)
    assert (moved.keys - first.keys).abs().max() > 1e-3


def test_merged_lora_prefix_equals_unmerged_and_restores_the_base():
    """Without gradients make_prefix runs on merged weights: equal to the unmerged pass, base bit-identical after."""
    hyper = make_hyper()
    perturb_lora(hyper, scale=0.2)
    hyper.eval()
    h_ids, h_am, *_ = toy_batch()
    real = h_am[0].bool()
    batches = [(h_ids, h_am), (h_ids[:1, real], h_am[:1, real])]  # left padded (gist mask) and unpadded (causal path)
    before = base_state(hyper)
    weights = {n: p for n, p in hyper.base.named_parameters() if "lora_" not in n}
    for step in range(2):
        for ids, am in batches:
            with torch.no_grad():
                merged = hyper.make_prefix(ids, am)
            assert hyper._merged is not None  # the merged path ran
            unmerged = hyper.make_prefix(ids, am)  # gradients on: LoRA unmerged, as in training
            assert unmerged.keys.requires_grad and hyper._merged is None
            torch.testing.assert_close(merged.keys, unmerged.keys.detach(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(merged.values, unmerged.values.detach(), atol=1e-4, rtol=1e-4)
            with torch.no_grad(), hyper.downstream_mode():  # the adapters matter: without them the prefix differs
                plain = extract_prefix(hyper.peft, ids, am, GIST_IDS, inputs_embeds=hyper.hyper_embeddings(ids))
            assert (plain.values - merged.values).abs().max() > 1e-3
        perturb_lora(hyper, scale=0.2, seed=2 + step)  # an in-place step: the merged copy must follow it
    after = dict(hyper.base.named_parameters())
    for n, p in before.items():
        assert after[n] is weights[n] and torch.equal(after[n], p), n
    assert not hyper.adapters_off
