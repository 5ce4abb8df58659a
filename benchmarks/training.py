"""Training: a HyperLlama step against plain full-attention fine-tuning over the same tokens.

Same demos and query for both (B rows; n demo tokens incl. BOS, k gists, q query tokens, loss on the
last 4):

    hyper    `HyperLlama.loss_and_backward`: hypernetwork pass over [demos][G_1..G_k] (LoRA on, gist
             mask), downstream pass over the q query tokens after the k-token prefix (adapters off),
             backward through both (weight gradients for LoRA and the gist table only)
    full     `LMTrainee(mask="causal").loss_and_backward`: one pass over [demos][query] (n + q tokens),
             every weight trained (gistlib's path: an explicit boolean mask made additive)
    full-hf  the same step through plain transformers (no explicit mask: sdpa's is_causal path)

each under sdpa and eager attention; then the share of a step spent building masks.
Optimizer steps are left out (they differ only by which parameters train). Run: python benchmarks/training.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from _common import forward_flops, pocket_model, print_table, setup, time_side_by_side, verdict, write_json

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.lm import LMTrainee
from gistlib.core.masks import make_causal_mask, make_gist_mask, to_additive
from gistlib.core.prefix import gist_positions, positions_from_mask, prefixed_causal_mask

K, Q_TOKENS, LABELLED = 16, 16, 4


def batch(B: int, L: int, gist_ids: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Hyper rows [BOS demos G..] (B, L), downstream rows (B, q), and ICL rows [BOS demos query] (B, L)."""
    g = torch.Generator().manual_seed(seed)
    n = L - K  # demo tokens incl. BOS; the ICL row is n + q - ... trimmed to L below
    demos = torch.randint(3, 512 - K, (B, n), generator=g)
    demos[:, 0] = 1
    query = torch.randint(3, 512 - K, (B, Q_TOKENS), generator=g)
    down_labels = torch.full_like(query, -100)
    down_labels[:, -LABELLED:] = query[:, -LABELLED:]
    hyper_ids = torch.cat([demos, torch.tensor([gist_ids]).expand(B, -1)], 1)  # (B, L)
    icl_ids = torch.cat([demos[:, : L - Q_TOKENS], query], 1)  # (B, L): the same query after the demos
    icl_labels = torch.full_like(icl_ids, -100)
    icl_labels[:, -LABELLED:] = query[:, -LABELLED:]
    down = torch.cat([query[:, :1] * 0 + 1, query[:, 1:]], 1)  # BOS first
    return {
        "hyper_ids": hyper_ids,
        "hyper_am": torch.ones_like(hyper_ids),
        "down_ids": down,
        "down_am": torch.ones_like(down),
        "down_labels": down_labels,
        "icl_ids": icl_ids,
        "icl_am": torch.ones_like(icl_ids),
        "icl_labels": icl_labels,
    }


def steps(impl: str, gist_ids: list[int], b: dict) -> dict:
    """The three training steps (forward + backward + zero_grad) over one model each."""
    hyper = HyperLlama(pocket_model(attn_implementation=impl), gist_ids, HyperConfig(num_gist_tokens=K)).train()
    full = LMTrainee(pocket_model(attn_implementation=impl), mask="causal").train()
    plain = pocket_model(attn_implementation=impl).train()
    for p in plain.parameters():
        p.requires_grad_(True)

    def hyper_step():
        hyper.loss_and_backward(b["hyper_ids"], b["hyper_am"], b["down_ids"], b["down_am"], b["down_labels"])
        hyper.zero_grad(set_to_none=True)

    def full_step():
        full.loss_and_backward(b["icl_ids"], b["icl_am"], b["icl_labels"])
        full.zero_grad(set_to_none=True)

    def plain_step():
        plain(input_ids=b["icl_ids"], labels=b["icl_labels"]).loss.backward()
        plain.zero_grad(set_to_none=True)

    return {"hyper": hyper_step, "full": full_step, "full-hf": plain_step}


def mask_work(b: dict, gist_ids: list[int]) -> dict:
    """The mask building each step does, as standalone calls (same shapes, float32 additive masks)."""
    k = len(gist_ids)

    def hyper_masks():
        to_additive(make_gist_mask(b["hyper_ids"], gist_ids, attention_mask=b["hyper_am"]))
        positions_from_mask(b["hyper_am"])
        gist_positions(b["hyper_ids"], gist_ids, b["hyper_am"])
        past = torch.ones(b["down_ids"].shape[0], k, dtype=torch.bool)
        to_additive(prefixed_causal_mask(past, b["down_am"]))
        positions_from_mask(b["down_am"], start=k)

    def full_masks():
        to_additive(make_causal_mask(b["icl_ids"], attention_mask=b["icl_am"]))
        positions_from_mask(b["icl_am"])

    return {"hyper_masks": hyper_masks, "full_masks": full_masks}


def profiled_mask_share(step) -> float:
    """Cross-check with cProfile: share of one step's time inside gistlib's mask functions."""
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    names = (
        "make_gist_mask",
        "make_causal_mask",
        "to_additive",
        "prefixed_causal_mask",
        "positions_from_mask",
        "gist_positions",
    )
    mask_time = sum(v[3] for (f, _, fn), v in stats.stats.items() if fn in names and "gistlib" in f)
    return mask_time / total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    machine = setup()
    B, L = args.batch, args.length
    gist_ids = list(range(512 - K, 512))
    b = batch(B, L, gist_ids)
    cfg = pocket_model().config
    flops = {  # per step, from the shapes
        "hyper": B
        * (
            forward_flops(cfg, L, logits_tokens=1, lora_rank=8, backward="frozen")
            + forward_flops(cfg, Q_TOKENS, past_tokens=K, backward="frozen")
        ),
        "full": B * forward_flops(cfg, L, backward="full"),
    }
    flops["full-hf"] = flops["full"]

    rows, times = [], {}
    for impl in ("sdpa", "eager"):
        fns = steps(impl, gist_ids, b)
        t = time_side_by_side(fns, repeats=args.repeats, target_s=0.0)
        times[impl] = t
        for name, sec in t.items():
            rows.append(
                {
                    "attention": impl,
                    "step": name,
                    "seconds": sec,
                    "tokens_per_s": B * L / sec,
                    "over_full": sec / t["full"],
                    "over_full_hf": sec / t["full-hf"],
                    "gflops": flops[name] / 1e9,
                    "gflops_per_s": flops[name] / sec / 1e9,
                }
            )
        if impl == "sdpa":
            share_profiled = {"hyper": profiled_mask_share(fns["hyper"]), "full": profiled_mask_share(fns["full"])}

    t1 = print_table(
        rows,
        [
            ("attention", "attn", "s"),
            ("step", "step", "s"),
            ("seconds", "s/step", ".3f"),
            ("tokens_per_s", "tokens/s", ".0f"),
            ("over_full", "/ full", ".2f"),
            ("over_full_hf", "/ full-hf", ".2f"),
            ("gflops", "GFLOP (shapes)", ".1f"),
            ("gflops_per_s", "GFLOP/s", ".1f"),
        ],
        f"Training step, B={B}, L={L} (hyper: {L - K} demo + {K} gist tokens, then {Q_TOKENS} query tokens)",
    )
    impl_rows = [
        {
            "step": s,
            "sdpa": times["sdpa"][s],
            "eager": times["eager"][s],
            "eager_over_sdpa": times["eager"][s] / times["sdpa"][s],
        }
        for s in times["sdpa"]
    ]
    t2 = print_table(
        impl_rows,
        [
            ("step", "step", "s"),
            ("sdpa", "sdpa s", ".3f"),
            ("eager", "eager s", ".3f"),
            ("eager_over_sdpa", "eager/sdpa", ".2f"),
        ],
        "sdpa against eager",
    )

    m = time_side_by_side(mask_work(b, gist_ids), repeats=max(5, args.repeats))
    mask_rows = [
        {
            "step": "hyper",
            "mask_ms": 1e3 * m["hyper_masks"],
            "step_s": times["sdpa"]["hyper"],
            "share_pct": 100 * m["hyper_masks"] / times["sdpa"]["hyper"],
            "profiled_pct": 100 * share_profiled["hyper"],
        },
        {
            "step": "full",
            "mask_ms": 1e3 * m["full_masks"],
            "step_s": times["sdpa"]["full"],
            "share_pct": 100 * m["full_masks"] / times["sdpa"]["full"],
            "profiled_pct": 100 * share_profiled["full"],
        },
    ]
    t3 = print_table(
        mask_rows,
        [
            ("step", "step", "s"),
            ("mask_ms", "mask ms", ".2f"),
            ("step_s", "step s", ".3f"),
            ("share_pct", "share %", ".2f"),
            ("profiled_pct", "cProfile %", ".2f"),
        ],
        f"Share of a step spent building masks (sdpa, B={B}, L={L})",
    )

    ratio = times["sdpa"]["hyper"] / times["sdpa"]["full"]
    targets = {
        "hyper step <= 1.5x a full-attention fine-tuning step (sdpa)": ratio <= 1.5,
        f"mask building < 2% of a step at B={B}, L={L}": all(r["share_pct"] < 2 for r in mask_rows),
    }
    print(
        f"target {verdict(ratio <= 1.5):6s}  hyper / full = {ratio:.2f} "
        f"(/ full-hf = {times['sdpa']['hyper'] / times['sdpa']['full-hf']:.2f}; "
        f"by FLOPs {flops['hyper'] / flops['full']:.2f})"
    )
    ok = targets[f"mask building < 2% of a step at B={B}, L={L}"]
    print(
        f"target {verdict(ok):6s}  mask share: hyper {mask_rows[0]['share_pct']:.2f}%, "
        f"full {mask_rows[1]['share_pct']:.2f}%"
    )
    write_json(
        "training",
        {
            "machine": machine,
            "B": B,
            "L": L,
            "k": K,
            "q": Q_TOKENS,
            "rows": rows,
            "attention": impl_rows,
            "masks": mask_rows,
            "flops": flops,
            "targets": targets,
            "tables": [t1, t2, t3],
        },
    )
    return {"rows": rows, "targets": targets}


if __name__ == "__main__":
    main()
