"""Inference: what a gist prefix saves per query, against in-context learning and prompt caching.

One task, n demo tokens, k gist tokens, queries of q tokens (scored: logits on the q tokens):

    (a) ICL      every query runs `[demos][query]`: n + q tokens, nothing kept between queries
    (b) cache    the demos' KV is computed once and kept (n tokens per layer); a query runs q tokens over it
    (c) gist     the hypernetwork turns `[demos][G_1..G_k]` into a k-token prefix once; a query runs q
                 tokens over it (this per-query time is also the floor: query tokens over a k-token cache)

Reported as ratios next to the ideal (n + q) / (k + q); FLOPs are computed from the shapes.
Run: python benchmarks/inference.py [--quick]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _common import forward_flops, pocket_model, print_table, setup, time_side_by_side, verdict, write_json
from transformers import DynamicCache

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.prefix import Prefix, forward_with_prefix

K, Q_TOKENS, Q_AMORTISE = 16, 8, 64


def demos_kv(model, demo_ids: torch.Tensor) -> Prefix:
    """Prompt caching: the demos' keys/values at positions 0..n-1, held as a (n_layers, 1, H, n, hd) Prefix.

    `forward_with_prefix` then runs a query at positions n, n+1, ... over it, exactly as over a gist prefix.
    """
    out = model(input_ids=demo_ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return Prefix(
        torch.stack([layer.keys for layer in out.cache.layers]),
        torch.stack([layer.values for layer in out.cache.layers]),
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    args = ap.parse_args(argv)
    machine = setup()
    ns = (64, 256) if args.quick else (64, 128, 256, 512, 1024)
    batches = (1, 8)
    repeats = 3 if args.quick else 7

    model = pocket_model()
    gist_ids = list(range(512 - K, 512))  # top of the 512-token vocabulary
    hyper = HyperLlama(pocket_model(), gist_ids, HyperConfig(num_gist_tokens=K)).eval()  # same weights, own copy
    cfg = model.config
    g = torch.Generator().manual_seed(0)

    rows = []
    with torch.inference_mode():
        for n in ns:
            demos = torch.randint(3, 512 - K, (1, n), generator=g)
            demos[0, 0] = 1  # BOS
            hyper_in = torch.cat([demos, torch.tensor([gist_ids])], 1)  # (1, n + k)
            cached = demos_kv(model, demos)
            prefix = hyper.make_prefix(hyper_in, torch.ones_like(hyper_in))
            for B in batches:
                query = torch.randint(3, 512 - K, (B, Q_TOKENS), generator=g)
                ones = torch.ones_like(query)
                icl_ids = torch.cat([demos.expand(B, -1), query], 1)  # (B, n + q)
                cache_b, prefix_b = cached.rows([0] * B), prefix.rows([0] * B)
                fns = {
                    "icl": partial(model, input_ids=icl_ids, logits_to_keep=Q_TOKENS),
                    "cache": partial(forward_with_prefix, model, cache_b, query, ones, logits_to_keep=Q_TOKENS),
                    "gist": partial(forward_with_prefix, model, prefix_b, query, ones, logits_to_keep=Q_TOKENS),
                }
                if B == batches[0]:  # one-time costs, per task (batch size does not matter)
                    fns["make_prefix"] = partial(hyper.make_prefix, hyper_in, torch.ones_like(hyper_in))
                    fns["make_cache"] = partial(demos_kv, model, demos)
                t = time_side_by_side(fns, repeats=repeats)
                if "make_prefix" in t:
                    once = {"make_prefix": t["make_prefix"], "make_cache": t["make_cache"]}
                per_q = {m: t[m] / B for m in ("icl", "cache", "gist")}
                flops = {
                    "icl": forward_flops(cfg, n + Q_TOKENS, logits_tokens=Q_TOKENS),
                    "cache": forward_flops(cfg, Q_TOKENS, past_tokens=n, logits_tokens=Q_TOKENS),
                    "gist": forward_flops(cfg, Q_TOKENS, past_tokens=K, logits_tokens=Q_TOKENS),
                    "make_prefix": forward_flops(cfg, n + K, logits_tokens=1, lora_rank=8),
                }
                amortised = per_q["gist"] + once["make_prefix"] / Q_AMORTISE
                amortised_flops = flops["gist"] + flops["make_prefix"] / Q_AMORTISE
                rows.append(
                    {
                        "n": n,
                        "B": B,
                        "k": K,
                        "q": Q_TOKENS,
                        "icl_ms": 1e3 * per_q["icl"],
                        "cache_ms": 1e3 * per_q["cache"],
                        "gist_ms": 1e3 * per_q["gist"],
                        "make_prefix_ms": 1e3 * once["make_prefix"],
                        "make_cache_ms": 1e3 * once["make_cache"],
                        "ideal_icl_over_gist": (n + Q_TOKENS) / (K + Q_TOKENS),
                        "flops_icl_over_gist": flops["icl"] / flops["gist"],
                        "time_icl_over_gist": per_q["icl"] / per_q["gist"],
                        "time_icl_over_cache": per_q["icl"] / per_q["cache"],
                        "time_cache_over_gist": per_q["cache"] / per_q["gist"],
                        "amortised_over_floor": amortised / per_q["gist"],
                        "ideal_amortised_over_floor": amortised_flops / flops["gist"],
                        "kv_bytes_cache": cached.nbytes(),
                        "kv_bytes_gist": prefix.nbytes(),
                        "kv_gist_over_cache": prefix.nbytes() / cached.nbytes(),
                        "k_over_n": K / n,
                        "flops": flops,
                    }
                )

    t1 = print_table(
        rows,
        [
            ("n", "n", "d"),
            ("B", "B", "d"),
            ("icl_ms", "ICL ms/q", ".3f"),
            ("cache_ms", "cache ms/q", ".3f"),
            ("gist_ms", "gist ms/q", ".3f"),
            ("ideal_icl_over_gist", "ideal (n+q)/(k+q)", ".1f"),
            ("flops_icl_over_gist", "FLOPs a/c", ".1f"),
            ("time_icl_over_gist", "time a/c", ".2f"),
            ("time_icl_over_cache", "time a/b", ".2f"),
            ("time_cache_over_gist", "time b/c", ".2f"),
        ],
        f"Per-query time, one task, k={K}, q={Q_TOKENS} (a = ICL, b = prompt cache, c = gist prefix)",
    )
    t2 = print_table(
        rows,
        [
            ("n", "n", "d"),
            ("B", "B", "d"),
            ("make_prefix_ms", "make prefix ms", ".2f"),
            ("make_cache_ms", "make cache ms", ".2f"),
            ("amortised_over_floor", f"(c)+gen/{Q_AMORTISE} / floor", ".3f"),
            ("ideal_amortised_over_floor", "same, by FLOPs", ".3f"),
            ("kv_bytes_cache", "KV bytes (b)", "d"),
            ("kv_bytes_gist", "KV bytes (c)", "d"),
            ("kv_gist_over_cache", "(c)/(b)", ".4f"),
            ("k_over_n", "k/n", ".4f"),
        ],
        f"One-time prefix cost amortised over Q={Q_AMORTISE} queries; KV memory held per task",
    )

    big = [r for r in rows if r["n"] >= 256]
    targets = {
        "gist >= 4x faster per query than ICL at n >= 256": all(r["time_icl_over_gist"] >= 4 for r in big),
        f"gist + generation/{Q_AMORTISE} within 1.3x of the floor": all(r["amortised_over_floor"] <= 1.3 for r in rows),
        "KV per task (c)/(b) = k/n": all(abs(r["kv_gist_over_cache"] - r["k_over_n"]) < 1e-12 for r in rows),
    }
    detail = {
        "gist >= 4x faster per query than ICL at n >= 256": {
            f"n={r['n']},B={r['B']}": round(r["time_icl_over_gist"], 2) for r in big
        },
        f"gist + generation/{Q_AMORTISE} within 1.3x of the floor": {
            f"n={r['n']},B={r['B']}": round(r["amortised_over_floor"], 3) for r in rows
        },
    }
    for name, ok in targets.items():
        print(f"target {verdict(ok):6s}  {name}  {detail.get(name, '')}")
    write_json(
        "inference",
        {
            "machine": machine,
            "k": K,
            "q": Q_TOKENS,
            "Q_amortise": Q_AMORTISE,
            "rows": rows,
            "targets": targets,
            "tables": [t1, t2],
            "quick": args.quick,
        },
    )
    return {"rows": rows, "targets": targets}


if __name__ == "__main__":
    main()
