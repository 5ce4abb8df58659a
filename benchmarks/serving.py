"""Batched multi-task serving: throughput with B different tasks' prefixes per batch against B = 1.

64 held-out classification tasks of the pocket suite, 4 queries each (256 queries). A HyperLlama
(random weights: timing only) makes one prefix per task into a `PrefixStore`; then queries are
answered B at a time, the B queries of a batch from B *different* tasks, one forward per batch
(rank classification over all choices) or one forward per generated token. A control batch holds
the same prompts under a single task's prefix: mixing tasks should cost nothing.
Run: python benchmarks/serving.py
"""

from __future__ import annotations

import argparse
import random

from _common import pocket_model, print_table, setup, time_side_by_side, write_json

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.data import (
    COMPACT,
    choice_ids,
    load_pocket_suite,
    pocket_tokenizer,
    render_downstream_prompt,
    render_hyper_input,
)
from gistlib.data.episodes import sample_episode
from gistlib.models.tiny import gist_token_ids
from gistlib.serve import PrefixStore

K, TASKS, QUERIES_PER_TASK, NEW_TOKENS = 16, 64, 4, 3


def workload(tok, gist_ids):
    """Hypernetwork inputs per task and the queries, ordered round-robin over tasks (neighbours differ)."""
    tasks = [t for t in load_pocket_suite()["test"] if t.family == "classify"][:TASKS]
    rng = random.Random(0)
    names, hyper_inputs, per_task = [], [], []
    for t in tasks:
        ep = sample_episode(t, t.meta["num_demos"], QUERIES_PER_TASK, rng)
        names.append(t.name)
        hyper_inputs.append(render_hyper_input(ep, tok, gist_ids, COMPACT))
        per_task.append(
            [(t.name, render_downstream_prompt(q, tok, COMPACT), choice_ids(q, tok, COMPACT)) for q in ep.queries]
        )
    queries = [per_task[t][j] for j in range(QUERIES_PER_TASK) for t in range(len(tasks))]
    return names, hyper_inputs, queries


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    machine = setup()
    tok = pocket_tokenizer(K)
    gist_ids = gist_token_ids(tok)
    names, hyper_inputs, queries = workload(tok, gist_ids)
    hyper = HyperLlama(pocket_model(vocab_size=len(tok)), gist_ids, HyperConfig(num_gist_tokens=K)).eval()
    pad = tok.pad_token_id

    # 1. making prefixes: one task per pass against 16 per pass
    stores = {bs: PrefixStore.from_hyper(hyper, pad_token_id=pad) for bs in (1, 16)}
    t_add = time_side_by_side(
        {bs: (lambda s=s, bs=bs: s.add(names, hyper_inputs, batch_size=bs)) for bs, s in stores.items()},
        repeats=3,
        target_s=0.0,
    )
    add_rows = [{"tasks_per_pass": bs, "seconds": t, "prefixes_per_s": len(names) / t} for bs, t in t_add.items()]

    # 2. serving from the frozen base alone (what a server deploys), and through the HyperLlama (adapters off)
    plain = PrefixStore(pocket_model(vocab_size=len(tok)), pad_token_id=pad)
    plain.put(stores[16].names, stores[16].get(stores[16].names))
    via_hyper = stores[16]
    tasks = [q[0] for q in queries]
    prompts = [q[1] for q in queries]
    choices = [q[2] for q in queries]
    one_task = [names[0]] * len(queries)

    def score(store, B, task_names=tasks):
        def run():
            for s in range(0, len(queries), B):  # one forward per B queries (all their choices)
                store.score_choices(task_names[s : s + B], prompts[s : s + B], choices[s : s + B], batch_size=10_000)

        return run

    def generate(store, B, task_names=tasks):
        def run():
            for s in range(0, len(queries), B):
                store.generate(task_names[s : s + B], prompts[s : s + B], NEW_TOKENS, batch_size=B)

        return run

    sizes = (1, 4, 16, 64)
    fns = {("score", B, "mixed"): score(plain, B) for B in sizes}
    fns[("score", 16, "one task")] = score(plain, 16, one_task)
    fns[("score", 16, "mixed, via HyperLlama")] = score(via_hyper, 16)
    fns.update({("generate", B, "mixed"): generate(plain, B) for B in sizes})
    fns[("generate", 16, "one task")] = generate(plain, 16, one_task)
    t = time_side_by_side(fns, repeats=args.repeats, target_s=0.0)
    rows = []
    for (kind, B, what), sec in t.items():
        base = t[(kind, 1, "mixed")]
        rows.append(
            {
                "kind": kind,
                "B": B,
                "batch": what,
                "seconds": sec,
                "queries_per_s": len(queries) / sec,
                "speedup_vs_B1": base / sec,
            }
        )

    t1 = print_table(
        add_rows,
        [
            ("tasks_per_pass", "tasks/pass", "d"),
            ("seconds", f"s for {len(names)}", ".3f"),
            ("prefixes_per_s", "prefixes/s", ".0f"),
        ],
        "Making prefixes (HyperLlama, pocket demos)",
    )
    t2 = print_table(
        rows,
        [
            ("kind", "kind", "s"),
            ("B", "B", "d"),
            ("batch", "batch holds", "s"),
            ("seconds", f"s / {len(queries)} q", ".3f"),
            ("queries_per_s", "queries/s", ".0f"),
            ("speedup_vs_B1", "x vs B=1", ".2f"),
        ],
        f"Serving {len(queries)} queries of {len(names)} tasks (score: all choices; generate: {NEW_TOKENS} tokens)",
    )
    mem = {
        "tasks": len(plain),
        "store_bytes": plain.nbytes(),
        "demo_kv_bytes": sum(len(h) - K for h in hyper_inputs) * plain.nbytes() // (len(plain) * K),
    }
    print(
        f"store: {mem['tasks']} tasks in {mem['store_bytes'] / 2**20:.2f} MiB; their demos' KV would be "
        f"{mem['demo_kv_bytes'] / 2**20:.2f} MiB"
    )
    write_json(
        "serving",
        {"machine": machine, "k": K, "make_prefixes": add_rows, "rows": rows, "memory": mem, "tables": [t1, t2]},
    )
    return {"rows": rows}


if __name__ == "__main__":
    main()
