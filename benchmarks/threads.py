"""Threads under a competing load: a training-like step at 1 and 2 torch threads, alone and beside a busy process.

The step is a HyperLlama `loss_and_backward` on the pocket-sized base (random weights: timing only), 32 tasks x
4 queries, the shape of `make main`'s Gisting/HyperLlama stages. The competing load is one spawned process that
spins on a core (as another job would). Each setting is timed interleaved with the others (1 thread, 2 threads),
median of the repeats; the machine's load average before each phase is recorded, since other work on the machine
counts too. What `gistlib.threads.choose_threads` would pick is printed beside.
Run: python benchmarks/threads.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch
from _common import BENCH, pocket_model, print_table, setup, time_paired, write_json

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.threads import choose_threads

K, TASKS, QUERIES, DEMO_TOKENS, QUERY_TOKENS = 16, 32, 4, 24, 8


def spin(seconds: float) -> None:
    """Keep one core busy for `seconds` (the competing process)."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def step_fn(hyper: HyperLlama, threads: int):
    """One training-like step (forward and backward, gradients zeroed) at `threads` torch threads."""
    g = torch.Generator().manual_seed(0)
    gist = hyper.gist_ids.tolist()
    demos = torch.randint(20, 512 - K, (TASKS, DEMO_TOKENS), generator=g)
    h_ids = torch.cat([demos, torch.tensor([gist] * TASKS)], 1)
    down = torch.randint(20, 512 - K, (TASKS * QUERIES, QUERY_TOKENS), generator=g)
    labels = torch.full_like(down, -100)
    labels[:, -2:] = down[:, -2:]
    task_index = torch.arange(TASKS).repeat_interleave(QUERIES)

    def run():
        torch.set_num_threads(threads)
        hyper.zero_grad(set_to_none=True)
        hyper.loss_and_backward(h_ids, torch.ones_like(h_ids), down, torch.ones_like(down), labels, task_index)

    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    machine = setup(1)
    repeats = 3 if args.quick else 7
    gist_ids = list(range(512 - K, 512))
    hyper = HyperLlama(pocket_model(), gist_ids, HyperConfig(num_gist_tokens=K)).train()
    fns = {t: step_fn(hyper, t) for t in (1, 2)}
    rows = []
    for load in ("none", "one busy process"):
        busy = None
        if load != "none":
            busy = mp.get_context("spawn").Process(target=spin, args=(3600.0,), daemon=True)
            busy.start()
            time.sleep(1.0)
        try:
            load_avg = os.getloadavg()[0]
            t = time_paired({f"{n} threads": fns[n] for n in (1, 2)}, repeats=repeats)
        finally:
            if busy is not None:
                busy.terminate()
                busy.join()
        chosen = choose_threads(None, announce=False)
        rows.append(
            {
                "competing_load": load,
                "load_average_1min": load_avg,
                "s_per_step_1_thread": t["1 threads"],
                "s_per_step_2_threads": t["2 threads"],
                "two_over_one": t["2 threads"] / t["1 threads"],
                "choose_threads_now": chosen,
            }
        )
    torch.set_num_threads(1)
    table = print_table(
        rows,
        [
            ("competing_load", "competing load", "s"),
            ("load_average_1min", "load avg", ".2f"),
            ("s_per_step_1_thread", "s/step 1 thread", ".3f"),
            ("s_per_step_2_threads", "s/step 2 threads", ".3f"),
            ("two_over_one", "2 / 1", ".2f"),
            ("choose_threads_now", "choose_threads", "d"),
        ],
        f"HyperLlama step (pocket size, {TASKS} tasks x {QUERIES} queries) at 1 vs 2 threads, {os.cpu_count()} cores",
    )
    payload = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/threads.py" + (" --quick" if args.quick else ""),
        "two_threads_over_one": {r["competing_load"]: round(r["two_over_one"], 3) for r in rows},
        "rows": rows,
        "tables": [table],
        "quick": args.quick,
    }
    write_json("threads_quick" if args.quick else "threads", payload, BENCH)
    return payload


if __name__ == "__main__":
    main()
