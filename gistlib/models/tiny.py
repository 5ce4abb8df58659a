"""Models and tokenizers that need no download.

Two builders back the smoke and pocket tiers:

- `build_tokenizer(corpus, num_gist_tokens)` trains a tokenizer in-process with the `tokenizers`
  library and wraps it as a transformers tokenizer with `<pad>`, `<s>`, `</s>` and `k` distinct gist
  tokens `<GIST_0> ... <GIST_{k-1}>`, each a single token.
- `build_tiny_llama(vocab_size, ...)` builds a randomly initialised Llama-architecture model from a
  small `LlamaConfig` (GQA allowed).

Both round-trip through `save_pretrained` / `from_pretrained` offline. The llama2 tier loads real
checkpoints with the same transformers classes, so every later module sees the same objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def gist_token_strings(num_gist_tokens: int) -> list[str]:
    """The k distinct gist token strings: `<GIST_0>`, ..., `<GIST_{k-1}>`."""
    return [f"<GIST_{i}>" for i in range(num_gist_tokens)]


def build_tokenizer(
    corpus: Iterable[str],
    num_gist_tokens: int = 16,
    kind: str = "bpe",  # "bpe": byte-level BPE, any text; "word": one token per word and per newline
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `corpus` and add pad/bos/eos/unk and `num_gist_tokens` gist tokens.

    The tokenizer never adds special tokens by itself: renderers put BOS/EOS where they belong,
    so `tok(text)["input_ids"]` is the text alone. Gist token ids: `gist_token_ids(tok)`.
    """
    specials = [PAD, BOS, EOS, UNK, *gist_token_strings(num_gist_tokens)]
    if kind == "bpe":
        core = Tokenizer(models.BPE(unk_token=None))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        core = Tokenizer(models.WordLevel(unk_token=UNK))
        # words and single newlines are tokens; spaces and tabs only separate
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
                pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            ]
        )
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"tokenizer kind must be 'bpe' or 'word', got {kind!r}")
    core.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=gist_token_strings(num_gist_tokens),
        padding_side="right",
    )


def gist_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids of `<GIST_0>`, `<GIST_1>`, ... in order (those the tokenizer has)."""
    ids = []
    while (tid := tokenizer.convert_tokens_to_ids(f"<GIST_{len(ids)}>")) not in (None, tokenizer.unk_token_id):
        ids.append(tid)
    return ids


def add_gist_tokens(tokenizer: PreTrainedTokenizerFast, num_gist_tokens: int) -> list[int]:
    """Add `<GIST_i>` special tokens to an existing tokenizer (for real checkpoints); return their ids.

    The model's embedding matrix must then be resized to `len(tokenizer)` if the ids fall outside it.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": gist_token_strings(num_gist_tokens)})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return gist_token_ids(tokenizer)


@dataclass
class TinyLlamaConfig:
    """Sizes of a tiny Llama. Defaults: the smoke tier (about 0.1M parameters)."""

    vocab_size: int = 512
    hidden_size: int = 64  # model width d
    num_layers: int = 2
    num_heads: int = 4  # query heads; head_dim = hidden_size // num_heads
    num_kv_heads: int = 2  # key/value heads (GQA when < num_heads)
    intermediate_size: int = 128  # SwiGLU MLP width
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    initializer_range: float = 0.02  # std of the random init (HF default)


def build_tiny_llama(
    config: TinyLlamaConfig | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",  # "eager" is needed for output_attentions=True
    tokenizer: PreTrainedTokenizerFast | None = None,
    **sizes: int,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture causal LM, in float32, in eval mode.

    `sizes` override fields of `config` (e.g. `num_layers=4`). With `tokenizer`, vocab size and
    the pad/bos/eos ids come from it.
    """
    cfg = config or TinyLlamaConfig()
    cfg = TinyLlamaConfig(**{**cfg.__dict__, **sizes})
    if tokenizer is not None:
        cfg.vocab_size = len(tokenizer)
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 1,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    return model.float().eval()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with `requires_grad`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
