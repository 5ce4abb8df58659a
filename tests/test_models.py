"""The tiny Llama and the in-process tokenizer: gist tokens, sizes, offline save/load round trips."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gistlib.models.tiny import build_tiny_llama, build_tokenizer, count_parameters, gist_token_ids

CORPUS = ["the cat sat on the mat\nInput:\nhello world\nOutput:\nfoo bar", "a dog ran far away from the cat"] * 10


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_tokenizer_has_specials_and_single_token_gists(kind):
    tok = build_tokenizer(CORPUS, num_gist_tokens=5, kind=kind)
    gids = gist_token_ids(tok)
    assert len(gids) == 5 and len(set(gids)) == 5
    for i, gid in enumerate(gids):
        assert tok(f"<GIST_{i}>")["input_ids"] == [gid]
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, *gids}) == 8
    ids = tok("cat sat<GIST_0><GIST_1>")["input_ids"]
    assert ids[-2:] == gids[:2] and tok.bos_token_id not in ids  # nothing added implicitly


def test_word_tokenizer_keeps_newlines_as_tokens():
    tok = build_tokenizer(CORPUS, 2, kind="word")
    assert tok.convert_ids_to_tokens(tok("cat\nOutput:\nfoo")["input_ids"]) == ["cat", "\n", "Output:", "\n", "foo"]


def test_bpe_tokenizer_round_trips_any_text():
    tok = build_tokenizer(CORPUS, 2, kind="bpe")
    text = "\nInput:\nunseen wörds 123\nOutput:\n"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tiny_llama_sizes_and_gqa():
    tok = build_tokenizer(CORPUS, 4)
    model = build_tiny_llama(tokenizer=tok, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1)
    cfg = model.config
    assert cfg.vocab_size == len(tok) and cfg.num_hidden_layers == 3 and cfg.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # 1 kv head x head_dim 16
    assert cfg.pad_token_id == tok.pad_token_id and model.dtype == torch.float32 and not model.training
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_tiny_llama(seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_save_and_load_round_trip_offline(tmp_path):
    tok = build_tokenizer(CORPUS, 4, kind="bpe")
    model = build_tiny_llama(tokenizer=tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    tok2 = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "the cat<GIST_0><GIST_1><GIST_2><GIST_3> sat"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] and gist_token_ids(tok2) == gist_token_ids(tok)
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_tokenizer_kind():
    with pytest.raises(ValueError, match="'bpe' or 'word'"):
        build_tokenizer(CORPUS, 2, kind="sentencepiece")
