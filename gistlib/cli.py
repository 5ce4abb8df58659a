"""Command line: `python -m gistlib <command>`.

tour     tiny model, gist mask, canonical prefix, exact-caching check (seconds)
course   the pocket course end to end (base, HyperLlama, Gisting, evaluation, prefix ladder)
base     pretrain the pocket base, the in-context learner everything else builds on (data/pocket_base)
train    train one HyperLlama on the pocket suite from a JSON config (works under `accelerate launch`)
recipe   a real-data recipe (p3 | sni | symbol) on a Llama checkpoint; `--tiny` runs it on a tiny 4-bit model
memory   the memory planner's table for Llama-2 7B/13B on 8-24 GB cards
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    """`--set name=value` pairs; values parsed as JSON where they parse (numbers, lists, booleans)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        out[name.strip()] = _parse_value(value)
    return out


def cmd_course(args) -> int:
    from gistlib.course.pipeline import run_pocket, tier_config
    from gistlib.course.report import results_table

    t0 = time.perf_counter()
    overrides = _overrides(args.set)
    if args.gist_sweep:
        overrides["gist_sweep"] = args.gist_sweep
    cfg = tier_config(args.tier, **overrides)
    summary = run_pocket(cfg)
    print("\n" + results_table(summary))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results, plots and summary.json in {cfg.out_dir}/")
    return 0


def cmd_base(args) -> int:
    """Pretrain the pocket base (the shipped data/pocket_base is made by exactly this command)."""
    from pathlib import Path

    from gistlib.course.pipeline import tier_config, train_base
    from gistlib.data import load_pocket_suite, pocket_tokenizer

    cfg = tier_config(args.tier, **_overrides(args.set))
    t0 = time.perf_counter()
    train_base(cfg, load_pocket_suite(), pocket_tokenizer(16), Path(args.out))
    print(f"base written to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_train(args) -> int:
    from gistlib.train_entry import run_train_config

    run_train_config(args.config, _overrides(args.set))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gistlib", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="tiny model, gist mask, canonical prefix, exact-caching check")
    tour.add_argument("--num-gist-tokens", type=int, default=4)
    course = sub.add_parser("course", help="the pocket course end to end")
    course.add_argument("--tier", default="pocket", help="pocket (laptop CPU) or smoke (seconds, for CI)")
    course.add_argument("--gist-sweep", type=int, nargs="*", help="extra gist-token counts, e.g. 1 2 4 16")
    course.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override PocketConfig fields")
    base = sub.add_parser("base", help="pretrain the pocket base (in-context learner) into --out")
    base.add_argument("--out", default="data/pocket_base")
    base.add_argument("--tier", default="pocket")
    base.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override PocketConfig fields")
    tr = sub.add_parser("train", help="train one HyperLlama from a JSON config")
    tr.add_argument("--config", help="JSON file with `model`, `hyper`, `train`, `data` sections")
    tr.add_argument("--set", nargs="*", metavar="SECTION.FIELD=VALUE", help="override config fields")
    sub.add_parser(
        "recipe", help="real-data recipe: python -m gistlib recipe p3|sni|symbol [--tiny] [--set k=v]", add_help=False
    )
    sub.add_parser("memory", help="memory planner table", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("tour", "course", "base", "memory"):  # these never need the hub: never stall on it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if argv and argv[0] == "recipe":
        from gistlib.course.recipes import main_recipe

        return main_recipe(argv[1:])
    if argv and argv[0] == "memory":
        from gistlib.models.memory import main as memory_main

        return memory_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command == "tour":
        from gistlib.course.tour import run_tour

        run_tour(num_gist_tokens=args.num_gist_tokens)
        return 0
    return {"course": cmd_course, "train": cmd_train, "base": cmd_base}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
