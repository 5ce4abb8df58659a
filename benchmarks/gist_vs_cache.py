"""Serving against the real peer: gist prefixes versus prompt caching, on the pocket model and at SmolLM2 size.

Per task: n demo tokens; k = 16 gist tokens; queries of q = 8 tokens. Two ways to answer many queries per task:

    cache   prompt caching: one pass over the demos keeps their n-token K/V; a query runs q tokens over it
    gist    HyperLlama turns `[demos][G_1..G_k]` into a k-token prefix once; a query runs q tokens over it

Both are served by the same code (`PrefixStore.forward` / `.generate`: K/V laid out once per batch, no
concatenation, GQA without repeating K/V); a store of caches is a store of n-token prefixes. The prompt cache
is also timed through plain transformers (`DynamicCache` per call, rows gathered per call), and its best
per-query time of the two is its figure. Batches of B > 1 hold B *different* tasks, for both methods.
Measured: the one-time cost per task (prefix vs cache pass, one task per pass), per-query time when scoring
(logits on the q tokens) and when decoding 8 tokens greedily, amortised cost over Q queries per task, and the
throughput at a fixed KV memory budget over a request stream across 1,000 tasks, where the stream's
hits and misses are *simulated* with an LRU over the budget and priced with the per-operation times measured
here (a miss rebuilds the task's prefix or cache, then the query runs in a batch of 8).
Random demo tokens; float32; 1 torch thread; paired, interleaved repeats, medians.
Run: python benchmarks/gist_vs_cache.py [--quick] [--models pocket,smol_shape,smol]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import OrderedDict
from functools import partial

import torch
from _common import BENCH, REPO, print_table, setup, time_paired, write_json
from transformers import DynamicCache, LlamaForCausalLM

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.prefix import Prefix, forward_with_prefix
from gistlib.models.flops import flops_bound
from gistlib.models.smol import smol_shaped_config
from gistlib.serve import PrefixStore
from gistlib.train.evaluate import generate_ids

K, Q_TOKENS, NEW_TOKENS, TASKS_IN_STORE = 16, 8, 8, 8
QS = (1, 8, 64, 512)
BUDGETS_GIB = (1, 4)
STREAM_TASKS, STREAM_REQUESTS, STREAM_BATCH = 1000, 20_000, 8


# --- models ------------------------------------------------------------------------------------


def load_model(name: str):
    """(model, gist ids) for `name`: two copies are made by the caller (hypernetwork and server)."""
    if name == "pocket":
        from gistlib.data import pocket_tokenizer
        from gistlib.models.tiny import gist_token_ids

        model = LlamaForCausalLM.from_pretrained(REPO / "data" / "pocket_base", local_files_only=True)
        return model.float().eval(), gist_token_ids(pocket_tokenizer(K))[:K]
    if name == "smol_shape":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(smol_shaped_config())
        return model.float().eval(), list(range(49_152, 49_152 + K))  # HyperLlama's own gist table: ids need not exist
    if name == "smol":
        from gistlib.models.loading import load_llama
        from gistlib.models.smol import smollm2_folder

        folder = smollm2_folder()
        model = load_llama(
            str(folder),
            quantization=None,
            dtype=torch.float32,
            gradient_checkpointing=False,
            prepare_for_kbit_training=False,
        )
        return model.eval(), list(range(model.config.vocab_size, model.config.vocab_size + K))
    raise ValueError(name)


def available(name: str) -> bool:
    if name != "smol":
        return True
    try:
        from gistlib.models.smol import smollm2_gguf

        smollm2_gguf()
        return True
    except ModuleNotFoundError:
        return False


# --- the two one-time operations ------------------------------------------------------------------


def make_cache(model, demo_ids: torch.Tensor) -> Prefix:
    """Prompt caching: the demos' K/V at positions 0..n-1 as a (n_layers, B, H_kv, n, hd) Prefix (one causal pass)."""
    out = model(input_ids=demo_ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return Prefix(
        torch.stack([layer.keys for layer in out.cache.layers]),
        torch.stack([layer.values for layer in out.cache.layers]),
    )


def plain_forward(model, prefix: Prefix, rows: list[int], query: torch.Tensor):
    """Plain transformers serving: gather the rows' K/V, a fresh `DynamicCache` per call (concatenates per layer)."""
    return forward_with_prefix(model, prefix.rows(rows), query, torch.ones_like(query), logits_to_keep=Q_TOKENS)


def unmerged(hyper: HyperLlama, ids: torch.Tensor) -> Prefix:
    """make_prefix with LoRA left unmerged (the training path's weights), for the record."""
    hyper.merge_lora_for_inference = False
    try:
        return hyper.make_prefix(ids, torch.ones_like(ids))
    finally:
        hyper.merge_lora_for_inference = True


# --- the request stream ---------------------------------------------------------------------------


def lru_misses(requests: list[int], capacity: int) -> int:
    """Misses of an LRU holding `capacity` tasks over the request stream (every first request is a miss)."""
    held: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for task in requests:
        if task in held:
            held.move_to_end(task)
            continue
        misses += 1
        held[task] = None
        if len(held) > capacity:
            held.popitem(last=False)
    return misses


def request_stream(pattern: str, seed: int = 0) -> list[int]:
    """STREAM_REQUESTS task ids over STREAM_TASKS tasks: `uniform`, or `zipf` (weight 1 / rank)."""
    rng = random.Random(seed)
    tasks = list(range(STREAM_TASKS))
    weights = [1.0] * STREAM_TASKS if pattern == "uniform" else [1.0 / (r + 1) for r in tasks]
    return rng.choices(tasks, weights=weights, k=STREAM_REQUESTS)


def stream_throughput(per_query_s: float, build_s: float, bytes_per_task: int, budget: int, pattern: str) -> dict:
    """Queries/s over the stream: LRU of floor(budget / bytes) tasks; each miss costs one build."""
    capacity = min(STREAM_TASKS, budget // bytes_per_task)
    misses = lru_misses(request_stream(pattern), max(capacity, 0)) if capacity > 0 else STREAM_REQUESTS
    seconds = misses * build_s + STREAM_REQUESTS * per_query_s
    return {"resident_tasks": int(capacity), "misses": misses, "queries_per_s": STREAM_REQUESTS / seconds}


# --- one model --------------------------------------------------------------------------------------


def bench_model(name: str, ns: tuple[int, ...], batches: tuple[int, ...], repeats: int, build_repeats: int) -> list:
    t_load = time.perf_counter()
    base, gist_ids = load_model(name)
    server, _ = load_model(name)  # the frozen model a server deploys (no LoRA wrappers on its path)
    hyper = HyperLlama(base, gist_ids, HyperConfig(num_gist_tokens=K)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero LoRA, as after training (timing does not depend on the values)
        for n_, p in hyper.named_parameters():
            if "lora_B" in n_:
                p.normal_(0, 0.01, generator=g)
    vocab = server.config.vocab_size
    low = max(gist_ids) + 1 if max(gist_ids) < vocab else 3  # demo and query tokens: never a gist id
    print(f"[{name}] loaded in {time.perf_counter() - t_load:.1f} s", flush=True)
    rows = []
    for n in ns:
        with torch.inference_mode():
            demos = torch.randint(low, vocab, (TASKS_IN_STORE, n), generator=g)
            demos[:, 0] = 1
            hyper_in = torch.cat([demos, torch.tensor([gist_ids] * TASKS_IN_STORE)], 1)  # (T, n + k)
            names = [f"task_{i}" for i in range(TASKS_IN_STORE)]
            gist_store, cache_store = PrefixStore(server), PrefixStore(server)
            gist_store.put(names, hyper.make_prefix(hyper_in, torch.ones_like(hyper_in)))
            cache_store.put(names, make_cache(server, demos))
            cache_all = cache_store.get(names)
            cache_plain = Prefix(cache_all.keys.clone(), cache_all.values.clone())  # for the transformers path
            gist_plain = Prefix(gist_store.get(names).keys.clone(), gist_store.get(names).values.clone())

            once = time_paired(
                {
                    "prefix": partial(hyper.make_prefix, hyper_in[:1], torch.ones_like(hyper_in[:1])),
                    "cache": partial(make_cache, server, demos[:1]),
                    "prefix_unmerged": partial(unmerged, hyper, hyper_in[:1]),
                },
                repeats=build_repeats,
            )
            for B in batches:
                tasks = names[:B]  # B different tasks in one batch
                rows_idx = list(range(B))
                query = torch.randint(low, vocab, (B, Q_TOKENS), generator=g)
                ones = torch.ones_like(query)
                prompts = query.tolist()
                score = {
                    "gist": partial(gist_store.forward, tasks, query, ones, logits_to_keep=Q_TOKENS),
                    "cache": partial(cache_store.forward, tasks, query, ones, logits_to_keep=Q_TOKENS),
                    "cache_transformers": partial(plain_forward, server, cache_plain, rows_idx, query),
                    "gist_transformers": partial(plain_forward, server, gist_plain, rows_idx, query),
                }
                decode = {
                    "gist": partial(gist_store.generate, tasks, prompts, NEW_TOKENS, batch_size=B),
                    "cache": partial(cache_store.generate, tasks, prompts, NEW_TOKENS, batch_size=B),
                    "cache_transformers": partial(
                        generate_ids, server, cache_plain.rows, rows_idx, prompts, NEW_TOKENS, None, 0, B
                    ),
                }
                t_score = time_paired(score, repeats=repeats)
                t_decode = time_paired(decode, repeats=max(2, repeats // 2))
                pq = {m: t / B for m, t in t_score.items()}
                pq_dec = {m: t / B for m, t in t_decode.items()}
                best_cache = min(pq["cache"], pq["cache_transformers"])
                best_cache_dec = min(pq_dec["cache"], pq_dec["cache_transformers"])
                amort = {
                    Q: (best_cache + once["cache"] / Q) / (pq["gist"] + once["prefix"] / Q) for Q in QS
                }  # cache time / gist time per query, each including its one-time cost over Q queries
                rows.append(
                    {
                        "model": name,
                        "n": n,
                        "B": B,
                        "make_prefix_ms": 1e3 * once["prefix"],
                        "make_prefix_unmerged_ms": 1e3 * once["prefix_unmerged"],
                        "make_cache_ms": 1e3 * once["cache"],
                        "prefix_over_cache_build": once["prefix"] / once["cache"],
                        "unmerged_prefix_over_cache_build": once["prefix_unmerged"] / once["cache"],
                        "floor_prefix_over_cache_build": (n + K) / n,
                        "gist_ms_per_query": 1e3 * pq["gist"],
                        "cache_ms_per_query": 1e3 * pq["cache"],
                        "cache_transformers_ms_per_query": 1e3 * pq["cache_transformers"],
                        "gist_transformers_ms_per_query": 1e3 * pq["gist_transformers"],
                        "gist_vs_cache_per_query": best_cache / pq["gist"],
                        "flops_cache_over_gist_per_query": flops_bound(server.config, n, K, Q_TOKENS),
                        **{f"gist_vs_cache_amortised_q{Q}": amort[Q] for Q in QS},
                        "decode_gist_ms_per_query": 1e3 * pq_dec["gist"],
                        "decode_cache_ms_per_query": 1e3 * best_cache_dec,
                        "decode_cache_transformers_ms_per_query": 1e3 * pq_dec["cache_transformers"],
                        "gist_vs_cache_decode_per_query": best_cache_dec / pq_dec["gist"],
                        "kv_bytes_per_task_gist": gist_store.nbytes() // TASKS_IN_STORE,
                        "kv_bytes_per_task_cache": cache_store.nbytes() // TASKS_IN_STORE,
                        "_pq_gist_s": pq["gist"],
                        "_pq_cache_s": best_cache,
                        "_build": once,
                    }
                )
                print(
                    f"[{name}] n={n} B={B}: prefix/cache build {once['prefix'] / once['cache']:.2f}, "
                    f"cache/gist per query {best_cache / pq['gist']:.2f}, Q=8 {amort[8]:.2f}",
                    flush=True,
                )
            del gist_store, cache_store, cache_all, cache_plain, gist_plain
        rows.extend(stream_rows(rows, name, n))
    return rows


def stream_rows(rows: list[dict], name: str, n: int) -> list[dict]:
    """Fixed-memory throughput for (name, n), from the B = STREAM_BATCH row's measured per-query and build times."""
    src = next((r for r in rows if r["model"] == name and r["n"] == n and r.get("B") == STREAM_BATCH), None)
    src = src or next(r for r in rows if r["model"] == name and r["n"] == n and "B" in r)
    out = []
    for gib in BUDGETS_GIB:
        for pattern in ("uniform", "zipf"):
            budget = gib * 2**30
            gist = stream_throughput(
                src["_pq_gist_s"], src["_build"]["prefix"], src["kv_bytes_per_task_gist"], budget, pattern
            )
            cache = stream_throughput(
                src["_pq_cache_s"], src["_build"]["cache"], src["kv_bytes_per_task_cache"], budget, pattern
            )
            out.append(
                {
                    "model": name,
                    "n": n,
                    "stream": f"{pattern}, B={src['B']}",
                    "budget_gib": gib,
                    "gist_resident": gist["resident_tasks"],
                    "cache_resident": cache["resident_tasks"],
                    "gist_misses": gist["misses"],
                    "cache_misses": cache["misses"],
                    "gist_qps": gist["queries_per_s"],
                    "cache_qps": cache["queries_per_s"],
                    "gist_vs_cache_throughput": gist["queries_per_s"] / cache["queries_per_s"],
                    "pattern": pattern,
                }
            )
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pocket and SmolLM2-shape, n = 256 only, few repeats")
    ap.add_argument("--models", default=None, help="comma list of pocket, smol_shape, smol (default: all available)")
    args = ap.parse_args(argv)
    machine = setup(1)
    t0 = time.perf_counter()
    models = args.models.split(",") if args.models else ["pocket", "smol_shape"] + (["smol"] if not args.quick else [])
    models = [m for m in models if available(m)]
    ns = (256,) if args.quick else (256, 1024)
    repeats, build_repeats = (3, 2) if args.quick else (5, 3)
    rows = []
    for name in models:
        rows += bench_model(name, ns, (1, 8), repeats, build_repeats)
    cells = [r for r in rows if "B" in r]
    streams = [r for r in rows if "stream" in r]

    t1 = print_table(
        cells,
        [
            ("model", "model", "s"),
            ("n", "n", "d"),
            ("B", "B", "d"),
            ("make_prefix_ms", "prefix ms", ".1f"),
            ("make_cache_ms", "cache ms", ".1f"),
            ("prefix_over_cache_build", "prefix/cache", ".3f"),
            ("unmerged_prefix_over_cache_build", "unmerged/cache", ".3f"),
            ("floor_prefix_over_cache_build", "floor (n+k)/n", ".3f"),
        ],
        "One-time cost per task: HyperLlama prefix (merged LoRA, causal path) vs prompt-cache pass, one task per pass",
    )
    t2 = print_table(
        cells,
        [
            ("model", "model", "s"),
            ("n", "n", "d"),
            ("B", "B", "d"),
            ("gist_ms_per_query", "gist ms/q", ".3f"),
            ("cache_ms_per_query", "cache ms/q", ".3f"),
            ("cache_transformers_ms_per_query", "cache HF ms/q", ".3f"),
            ("gist_transformers_ms_per_query", "gist HF ms/q", ".3f"),
            ("gist_vs_cache_per_query", "best cache/gist", ".2f"),
            ("flops_cache_over_gist_per_query", "FLOPs cache/gist", ".2f"),
            *[(f"gist_vs_cache_amortised_q{Q}", f"Q={Q}", ".2f") for Q in QS],
        ],
        f"Scoring q={Q_TOKENS} tokens per query; cache/gist time (> 1: gist faster), per query and amortised "
        "over Q queries per task (one-time cost / Q added to each); FLOPs cache/gist: the same ratio in arithmetic "
        "(gistlib.models.flops: the dense layers, the same for both, are most of a query at SmolLM2 size)",
    )
    t3 = print_table(
        cells,
        [
            ("model", "model", "s"),
            ("n", "n", "d"),
            ("B", "B", "d"),
            ("decode_gist_ms_per_query", "gist ms/q", ".2f"),
            ("decode_cache_ms_per_query", "best cache ms/q", ".2f"),
            ("decode_cache_transformers_ms_per_query", "cache HF ms/q", ".2f"),
            ("gist_vs_cache_decode_per_query", "cache/gist", ".2f"),
            ("kv_bytes_per_task_gist", "KV B/task gist", "d"),
            ("kv_bytes_per_task_cache", "KV B/task cache", "d"),
        ],
        f"Greedy decoding of {NEW_TOKENS} tokens after a {Q_TOKENS}-token prompt, per query",
    )
    t4 = print_table(
        streams,
        [
            ("model", "model", "s"),
            ("n", "n", "d"),
            ("stream", "stream", "s"),
            ("budget_gib", "KV GiB", "d"),
            ("gist_resident", "gist tasks held", "d"),
            ("cache_resident", "cache tasks held", "d"),
            ("gist_misses", "gist misses", "d"),
            ("cache_misses", "cache misses", "d"),
            ("gist_qps", "gist q/s", ".1f"),
            ("cache_qps", "cache q/s", ".1f"),
            ("gist_vs_cache_throughput", "gist/cache", ".1f"),
        ],
        f"SIMULATED stream: {STREAM_REQUESTS} requests over {STREAM_TASKS} tasks, LRU over the KV budget, priced with "
        "the measured per-query (batch of 8) and build times; a miss rebuilds the prefix or cache",
    )

    def per(key: str, src: list[dict], where=lambda r: True) -> dict:
        return {f"{r['model']}/n={r['n']}/B={r['B']}": round(r[key], 4) for r in src if where(r)}

    names = {
        "prefix_over_cache_build": {f"{r['model']}/n={r['n']}": round(r["prefix_over_cache_build"], 4) for r in cells},
        "gist_vs_cache_per_query": per("gist_vs_cache_per_query", cells),
        "gist_vs_cache_amortised_q8": per("gist_vs_cache_amortised_q8", cells),
        "gist_vs_cache_decode_per_query": per("gist_vs_cache_decode_per_query", cells),
        "gist_vs_cache_throughput_fixed_memory": {
            f"{r['model']}/n={r['n']}/{r['budget_gib']}GiB/{r['pattern']}": round(r["gist_vs_cache_throughput"], 2)
            for r in streams
        },
    }
    targets = {
        "prefix making <= 1.1x a prompt-cache pass": all(r["prefix_over_cache_build"] <= 1.1 for r in cells),
        "amortised over Q=8, gist >= best cache at every size": all(
            r["gist_vs_cache_amortised_q8"] >= 1 for r in cells
        ),
        "per query at n=1024, B=8, gist >= 3x best cache": all(
            r["gist_vs_cache_per_query"] >= 3 for r in cells if r["n"] == 1024 and r["B"] == 8
        )
        if any(r["n"] == 1024 for r in cells)
        else None,
        "fixed KV budget where caches no longer all fit: gist throughput >= 5x": all(
            r["gist_vs_cache_throughput"] >= 5 for r in streams if r["cache_resident"] < STREAM_TASKS
        ),
    }
    for name, ok in targets.items():
        print(f"target {'n/a' if ok is None else ('MET' if ok else 'MISSED'):6s}  {name}")
    seconds = time.perf_counter() - t0
    print(f"total {seconds:.0f} s")
    for r in cells:
        r.pop("_pq_gist_s"), r.pop("_pq_cache_s")
    payload = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/gist_vs_cache.py" + (" --quick" if args.quick else ""),
        "k": K,
        "q": Q_TOKENS,
        "new_tokens": NEW_TOKENS,
        "stream": {"tasks": STREAM_TASKS, "requests": STREAM_REQUESTS, "batch": STREAM_BATCH, "simulated": True},
        **names,
        "targets": targets,
        "rows": cells,
        "streams": streams,
        "tables": [t1, t2, t3, t4],
        "seconds": seconds,
        "quick": args.quick,
    }
    write_json("gist_vs_cache_quick" if args.quick else "gist_vs_cache", payload, BENCH)
    return payload


if __name__ == "__main__":
    main()
