"""gistlib.models.loading on the CPU: 4-bit nf4 loading of a saved tiny Llama, frozen-ness, and each error."""

from __future__ import annotations

import bitsandbytes as bnb
import httpx2
import pytest
import torch
from huggingface_hub import errors as hub_errors
from transformers import GPT2Config

from gistlib.models import loading
from gistlib.models.loading import (
    CheckpointNotFoundError,
    CudaRequiredError,
    GatedCheckpointError,
    ModelOutOfMemoryError,
    NotLlamaError,
    check_llama_modules,
    is_frozen,
    load_llama,
    quantization_config,
)
from gistlib.models.tiny import build_tiny_llama

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved float32 tiny Llama (hidden 64, MLP 128: multiples of the 64-value 4-bit block) and the model."""
    model = build_tiny_llama(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def nf4_model(tiny_checkpoint):
    path, _ = tiny_checkpoint
    return load_llama(path, quantization="nf4")


def decoder_linears(model):
    for layer in model.model.layers:
        for name in LINEAR_NAMES:
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            yield name, module


def test_quantization_config_is_qlora_not_bnb_defaults():
    cfg = quantization_config("nf4")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8").load_in_8bit and quantization_config(None) is None
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantization_config("fp4")


def test_nf4_layers_are_linear4bit_nf4_double_quant_bf16(nf4_model):
    # inspect before any forward: a CPU eval forward repacks weights and un-nests absmax
    linears = list(decoder_linears(nf4_model))
    assert len(linears) == 2 * 7
    for name, module in linears:
        assert isinstance(module, bnb.nn.Linear4bit), name
        state = module.weight.quant_state
        assert state.quant_type == "nf4", name
        assert getattr(state, "original_nested", state.nested) is True, f"{name}: no double quantisation"
        assert module.compute_dtype == torch.bfloat16, name
    # embeddings, lm_head and norms stay unquantised, upcast to fp32 by k-bit preparation
    assert nf4_model.model.embed_tokens.weight.dtype == torch.float32
    assert nf4_model.lm_head.weight.dtype == torch.float32
    assert nf4_model.model.norm.weight.dtype == torch.float32


def test_nf4_all_frozen_checkpointing_non_reentrant(nf4_model):
    assert is_frozen(nf4_model)
    assert nf4_model.config._attn_implementation == "sdpa"
    assert nf4_model.config.use_cache is False
    for layer in nf4_model.model.layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is False


def test_nf4_forward_close_to_float_model(tiny_checkpoint, nf4_model):
    _, float_model = tiny_checkpoint
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = float_model(ids).logits
        got = nf4_model(ids).logits.float()
    diff = (got - ref).abs().max().item()
    corr = torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1].item()
    print(f"nf4 vs float32 logits: max abs diff {diff:.4f}, max |ref| {ref.abs().max():.4f}, corr {corr:.4f}")
    assert torch.isfinite(got).all()
    assert diff < 0.25 and corr > 0.95  # measured: diff ~0.08, |ref| ~0.7, corr ~0.99


def test_nf4_backward_reaches_inputs_and_leaves_base_untouched(tiny_checkpoint):
    """A training-mode step with checkpointing: gradient reaches a trainable input; base gets none."""
    path, _ = tiny_checkpoint
    model = load_llama(path, quantization="nf4").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p.detach(), before[n]), n


def test_nf4_backward_still_reaches_inputs_after_an_eval_pass(tiny_checkpoint):
    """bitsandbytes repacks a 4-bit weight for a backward-less CPU kernel on its first eval, no-grad pass (on
    AVX512-BF16 CPUs): `load_llama` switches that off, so validation during training keeps gradients flowing."""
    path, _ = tiny_checkpoint
    model = load_llama(path, quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.eval()(input_ids=ids)  # the validation pass
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model.train()(inputs_embeds=embeds, labels=ids).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_float_load_is_frozen_and_exact(tiny_checkpoint):
    path, float_model = tiny_checkpoint
    model = load_llama(path, quantization=None, dtype=torch.float32, gradient_checkpointing=False)
    assert is_frozen(model)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, float_model(ids).logits)


# ------------------------------------------------------------------ errors


def test_cuda_device_map_without_cuda(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CudaRequiredError, match="needs a CUDA GPU") as info:
        load_llama(tiny_checkpoint[0], device_map="cuda")
    assert isinstance(info.value, RuntimeError) and "device_map='cpu'" in str(info.value)
    with pytest.raises(CudaRequiredError):
        load_llama(tiny_checkpoint[0], quantization="int8", device_map={"": 0})


def test_default_device_map_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.resolve_device_map(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.resolve_device_map(None) == {"": 0}


def test_non_llama_checkpoint(tmp_path):
    GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path)
    with pytest.raises(NotLlamaError, match="model_type is 'gpt2'") as info:
        load_llama(tmp_path, quantization=None)
    assert isinstance(info.value, ValueError)


def test_non_llama_modules():
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100))
    with pytest.raises(NotLlamaError, match="model.layers"):
        check_llama_modules(gpt2)
    llama = build_tiny_llama()
    check_llama_modules(llama)  # passes
    del llama.model.layers[1].mlp.gate_proj
    with pytest.raises(NotLlamaError, match="layer 1 .* lacks mlp.gate_proj"):
        check_llama_modules(llama)


def test_missing_local_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint folder") as info:
        load_llama(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        load_llama(tmp_path)


def test_hub_id_offline_not_cached():
    # HF_HUB_OFFLINE=1 in the test environment: no network is touched
    with pytest.raises(CheckpointNotFoundError, match="not in the local cache") as info:
        load_llama("gistlib-test/no-such-model-anywhere")
    assert "huggingface-cli download" in str(info.value)


def _gated_error() -> hub_errors.GatedRepoError:
    url = "https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/config.json"
    response = httpx2.Response(403, request=httpx2.Request("GET", url))
    return hub_errors.GatedRepoError("Access to model meta-llama/Llama-2-7b-hf is restricted.", response=response)


def test_gated_checkpoint_explains_access(monkeypatch):
    def raise_gated(*args, **kwargs):  # what transformers does: OSError raised from GatedRepoError
        raise OSError("You are trying to access a gated repo.") from _gated_error()

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", raise_gated)
    with pytest.raises(GatedCheckpointError) as info:
        load_llama("meta-llama/Llama-2-7b-hf")
    msg = str(info.value)
    assert isinstance(info.value, PermissionError)
    assert "huggingface-cli login" in msg and "https://huggingface.co/meta-llama/Llama-2-7b-hf" in msg
    assert "local folder" in msg


def test_repo_not_found_explained(monkeypatch):
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/x/y"))

    def raise_missing(*args, **kwargs):
        raise OSError("x/y is not a local folder and is not a valid model identifier") from (
            hub_errors.RepositoryNotFoundError("404", response=response)
        )

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", raise_missing)
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    with pytest.raises(CheckpointNotFoundError, match="No model 'x/y' on the hub"):
        load_llama("x/y")


def test_out_of_memory_names_settings(tiny_checkpoint, monkeypatch):
    def raise_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", raise_oom)
    with pytest.raises(ModelOutOfMemoryError) as info:
        load_llama(tiny_checkpoint[0], quantization=None, gradient_checkpointing=False)
    msg = str(info.value)
    assert isinstance(info.value, torch.OutOfMemoryError)  # existing handlers still catch it
    assert "quantization='nf4'" in msg and "gradient_checkpointing=True" in msg
    assert "batch size" in msg and "hyper_len" in msg
    with (
        pytest.raises(ModelOutOfMemoryError, match="training step"),
        loading.out_of_memory_advice("a training step"),
    ):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    with (
        pytest.raises(RuntimeError, match="unrelated"),
        loading.out_of_memory_advice("a step"),
    ):  # passes through
        raise RuntimeError("unrelated")
