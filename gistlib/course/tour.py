"""The quick tour: a tiny Llama, a gist mask, a canonical prefix, and the exact-caching check.

Run `python -m gistlib tour`. Everything is built in-process (no download) in a few seconds.
"""

from __future__ import annotations

import time

import torch

from gistlib.core.masks import make_gist_mask, mask_to_string
from gistlib.core.prefix import extract_prefix, forward_with_mask, forward_with_prefix, positions_from_mask
from gistlib.models.tiny import build_tiny_llama, build_tokenizer, count_parameters, gist_token_ids

CORPUS = [
    "translate to french: cat -> chat, dog -> chien, house -> maison",
    "antonyms: hot -> cold, up -> down, big -> small",
    "\nInput:\nthe movie was great\nOutput:\npositive",
    "\nInput:\nthe plot made no sense\nOutput:\nnegative",
]


def run_tour(num_gist_tokens: int = 4, seed: int = 0) -> dict[str, float]:
    """Print each step; return the measured numbers (max abs differences, seconds)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tok = build_tokenizer(CORPUS * 20, num_gist_tokens=num_gist_tokens, kind="bpe", vocab_size=300)
    gists = gist_token_ids(tok)
    model = build_tiny_llama(tokenizer=tok, seed=seed, num_layers=2, num_heads=4, num_kv_heads=2)
    print(f"1. tiny Llama: {count_parameters(model):,} parameters, vocab {len(tok)}, gist ids {gists}")

    demo = tok("up -> down, hot ->")["input_ids"][:4]
    query = tok(" cold")["input_ids"]
    row = [tok.bos_token_id, *demo, *gists, *query]
    ids = torch.tensor([row])
    mask = make_gist_mask(ids, gists)
    labels = [
        "<s>",
        *[f"d{i}" for i in range(len(demo))],
        *[f"G{i}" for i in range(len(gists))],
        *[f"q{i}" for i in range(len(query))],
    ]
    print("\n2. gist mask over [demos][gists][query] (x = may attend):")
    print(mask_to_string(mask[0], labels))

    demos_a = [tok.bos_token_id, *tok("cat -> chat, dog -> chien")["input_ids"]]
    demos_b = [tok.bos_token_id, *tok("hot -> cold")["input_ids"]]
    q = tok(" house ->")["input_ids"]
    rows = [demos_a + gists, demos_b + gists]
    L = max(map(len, rows))
    h_ids = torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in rows])  # left padded
    h_am = (torch.arange(L)[None] >= torch.tensor([[L - len(r)] for r in rows])).long()
    prefix = extract_prefix(model, h_ids, h_am, gists)
    print(
        f"\n3. canonical prefix from two tasks of {len(demos_a)} and {len(demos_b)} tokens: keys and values "
        f"(layers, B, kv_heads, k, head_dim) = {tuple(prefix.keys.shape)}"
    )

    q_ids = torch.tensor([q, q])
    cached = forward_with_prefix(model, prefix, q_ids, torch.ones_like(q_ids)).logits
    diffs = []
    for b, r in enumerate(rows):
        full = torch.tensor([r + q])
        out = forward_with_mask(
            model, make_gist_mask(full, gists), positions_from_mask(torch.ones_like(full)), input_ids=full
        )
        diffs.append((out.logits[0, len(r) :] - cached[b]).abs().max().item())
    max_diff = max(diffs)
    print("\n4. gist caching check: single sequence under the gist mask vs prefix + query at positions k...")
    print(f"   max |logit difference| = {max_diff:.2e}  ({'exact' if max_diff < 1e-4 else 'MISMATCH'})")
    seconds = time.perf_counter() - t0
    print(f"\nDone in {seconds:.2f} s (after imports). Next: the notebooks in notebooks/ (see README).")
    if max_diff >= 1e-4:
        raise SystemExit("gist caching check failed")
    return {"max_abs_diff": max_diff, "seconds": seconds}
