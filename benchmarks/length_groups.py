"""Training steps on real pocket batches, one padded pass against passes grouped by length (`length_groups`).

A pocket HyperLlama batch mixes C2 tasks (a few demos) with C8 ones (16): a third of the hypernetwork's and
the ICL teacher's tokens were padding. `make_prefix`, the teacher and Gisting's student now run two passes,
rows of similar length together. This script times a step both ways, interleaved (`_common.time_paired`), on
the pocket config's batches (`make main`'s sizes), and checks the gradients agree.

    .venv/bin/python benchmarks/length_groups.py     # results/bench/length_groups.json
"""

from __future__ import annotations

from dataclasses import replace

import torch
from _common import BENCH, print_table, setup, time_paired, write_json

import gistlib.core.prefix as prefix_module
from gistlib.core.hyper import HyperLlama
from gistlib.core.lm import LMTrainee
from gistlib.course.experiment import load_experiment
from gistlib.course.runner import _training_episodes, load_bundle
from gistlib.data.batches import gisting_batches, hyper_batches

BATCHES = 6  # per timed sample


def main() -> None:
    machine = setup()
    exp = load_experiment("configs/pocket.json")
    b, t, d = load_bundle(exp), exp.train, exp.data
    hyper_stream = hyper_batches(
        _training_episodes(b, 0, t.queries_per_task, t.tasks_per_batch), b.tokenizer, b.gist_ids(8),
        t.tasks_per_batch, b.fmt, d.max_hyper_tokens, d.max_tokens, t.teacher_queries,
    )  # fmt: skip
    gist_stream = gisting_batches(
        _training_episodes(b, 0, 1, t.gisting_batch), b.tokenizer, b.gist_ids(8), t.gisting_batch, b.fmt,
        d.max_hyper_tokens + d.max_tokens, teacher=True,
    )  # fmt: skip
    hyper_b = [next(hyper_stream) for _ in range(BATCHES)]
    gist_b = [next(gist_stream) for _ in range(BATCHES)]
    hyper = HyperLlama(b.fresh_base(), b.gist_ids(8), replace(exp.hyper, seed=0)).train()
    trainee = LMTrainee(b.fresh_base(), "gist", b.gist_ids(8), distill_weight=3.0, teacher=b.fresh_base()).train()
    gist_keys = ("input_ids", "attention_mask", "labels", "icl_input_ids", "icl_attention_mask")

    def steps(model, batches, keys=None):
        def run():
            for x in batches:
                model.zero_grad(set_to_none=True)
                model.loss_and_backward(**({k: x[k] for k in keys} if keys else x))
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        return run

    padding = {
        "hyper_inputs": _padding(hyper_b, "hyper_attention_mask"),
        "teacher_rows": _padding(hyper_b, "icl_attention_mask"),
        "gisting_rows": _padding(gist_b, "attention_mask"),
    }
    rows, payload = [], {"machine": machine, "batches_per_sample": BATCHES, "padding_fraction": padding}
    for name, model, batches, keys in (
        ("hyperllama", hyper, hyper_b, None),
        ("gisting", trainee, gist_b, gist_keys),
    ):
        run = steps(model, batches, keys)
        grads = {}

        def timed(on, run=run, grads=grads):
            def call():
                _switch(on)
                grads[on] = run()

            return call

        times = time_paired({"one_pass": timed(False), "grouped": timed(True)}, repeats=5)
        _switch(True)
        diff = max((grads[True][n] - grads[False][n]).abs().max().item() for n in grads[True])
        scale = max(g.abs().max().item() for g in grads[False].values())
        row = {
            "method": name,
            "one_pass_s_per_step": times["one_pass"] / BATCHES,
            "grouped_s_per_step": times["grouped"] / BATCHES,
            "speedup": times["one_pass"] / times["grouped"],
            "grad_max_abs_diff": diff,
            "grad_max_abs": scale,
        }
        rows.append(row)
    payload["rows"] = rows
    print(f"padding fraction of the pocket batches: {padding}")
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("one_pass_s_per_step", "one pass s/step", ".3f"),
            ("grouped_s_per_step", "grouped s/step", ".3f"),
            ("speedup", "speed-up", ".2f"),
            ("grad_max_abs_diff", "grad max |diff|", ".1e"),
            ("grad_max_abs", "grad max |g|", ".2f"),
        ],
        f"training step, pocket config batches, {machine['torch_threads']} thread(s)",
    )
    write_json("length_groups", payload, BENCH)


def _padding(batches: list[dict], key: str) -> float:
    masks = [x[key] for x in batches]
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def _switch(on: bool) -> None:
    whole = lambda mask, **_: [torch.arange(mask.shape[0])]  # noqa: E731
    fn = _ORIGINAL if on else whole
    prefix_module.length_groups = fn  # HyperLlama, the teacher and LMTrainee all group through this name


_ORIGINAL = prefix_module.length_groups

if __name__ == "__main__":
    main()
