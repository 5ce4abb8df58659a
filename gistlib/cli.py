"""Command line: `python -m gistlib <command>`.

run      an experiment config (configs/smoke|pocket|p3|sni|symbol.json, or any file): every method it enables,
         scored on the same episodes; `--tiny` runs it on a tiny random 4-bit model (CPU, minutes)
base     pretrain the pocket base, the in-context learner everything else builds on (data/pocket_base)
train    train one HyperLlama from a JSON config, no evaluation (works under `accelerate launch`)
report   RESULTS.md from runs' summary.json files
ship     copy a config's trained models from its cache_dir into the repository (its run.shipped_dir)
tour     tiny model, gist mask, canonical prefix, exact-caching check (seconds)
memory   the memory planner's table for Llama-2 7B/13B on 8-24 GB cards

    python -m gistlib run configs/pocket.json --set train.hyper_steps=800 --set run.seeds=[0] [--dump]

`--set section.field=value` is repeatable (and takes several pairs); every occurrence applies, in order.
Values are JSON where they parse, else text, and are type-checked against the config's fields.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field"
    )


def cmd_run(args) -> int:
    from gistlib.course.experiment import load_experiment, tiny_experiment
    from gistlib.course.report import results_table

    exp = load_experiment(args.config, args.set)
    if args.tiny:
        exp = tiny_experiment(exp)
    if args.dump:
        print(json.dumps(exp.to_dict(), indent=1))
        return 0
    from gistlib.course.runner import run_experiment

    t0 = time.perf_counter()
    summary = run_experiment(exp)
    print("\n" + results_table(summary))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results, plots and summary.json in {exp.run.out_dir}/")
    return 0


def cmd_ship(args) -> int:
    """Copy the trained models of a config from its cache into `--to` (default: its run.shipped_dir)."""
    from pathlib import Path

    from gistlib.course.experiment import load_experiment
    from gistlib.course.runner import ship_models
    from gistlib.data.files import REPO_ROOT

    exp = load_experiment(args.config, args.set)
    dest = args.to or exp.run.shipped_dir
    if not dest:
        print("gistlib ship: the config has no run.shipped_dir; pass --to DIR", file=sys.stderr)
        return 2
    for folder in ship_models(exp, REPO_ROOT / dest if not Path(dest).is_absolute() else Path(dest)):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {size / 2**20:.1f} MiB")
    return 0


def cmd_report(args) -> int:
    """RESULTS.md from runs' summary.json files (so a reported number cannot drift from the run that made it)."""
    from pathlib import Path

    from gistlib.course.report import results_markdown

    summaries = [json.loads(Path(p).read_text()) for p in args.summaries]
    Path(args.out).write_text(results_markdown(summaries))
    print(f"{args.out}: {len(summaries)} run(s)")
    return 0


def cmd_base(args) -> int:
    """Pretrain the pocket base (the shipped data/pocket_base is made by exactly this command)."""
    from pathlib import Path

    from gistlib.course.experiment import load_experiment
    from gistlib.course.runner import train_base
    from gistlib.data import pocket_tokenizer
    from gistlib.data.sources import make_source

    exp = load_experiment(args.config, args.set)
    tok = pocket_tokenizer(16)
    t0 = time.perf_counter()
    train_base(exp, make_source(exp.data, tok, exp.hyper.num_gist_tokens), tok, Path(args.out))
    print(f"base written to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_train(args) -> int:
    from gistlib.train.entry import run_train_config

    run_train_config(args.config, args.set)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gistlib", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment config (every tier and recipe)")
    run.add_argument("config", help="a config file, or the name of one under configs/ (smoke, pocket, p3, sni, symbol)")
    _add_set(run)
    run.add_argument("--dump", action="store_true", help="print the resolved config as JSON and exit")
    run.add_argument("--tiny", action="store_true", help="a tiny random 4-bit Llama built on the data (CPU check)")
    rep = sub.add_parser("report", help="write RESULTS.md from runs' summary.json files")
    rep.add_argument("summaries", nargs="+", help="summary.json files, in the order to report them")
    rep.add_argument("--out", default="RESULTS.md")
    ship = sub.add_parser("ship", help="copy a config's trained models from its cache into the repository")
    ship.add_argument("config")
    ship.add_argument("--to", default="", help="destination folder (default: the config's run.shipped_dir)")
    _add_set(ship)
    base = sub.add_parser("base", help="pretrain the pocket base (in-context learner) into --out")
    base.add_argument("--config", default="pocket")
    base.add_argument("--out", default="data/pocket_base")
    _add_set(base)
    tr = sub.add_parser("train", help="train one HyperLlama from a JSON config")
    tr.add_argument("--config", help="JSON file with `model`, `hyper`, `train`, `data` sections")
    _add_set(tr)
    tour = sub.add_parser("tour", help="tiny model, gist mask, canonical prefix, exact-caching check")
    tour.add_argument("--num-gist-tokens", type=int, default=4)
    sub.add_parser("memory", help="memory planner table", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    offline = argv and (argv[0] in ("tour", "base", "memory") or "--tiny" in argv)
    if offline:  # these never need the hub: never stall on it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if argv and argv[0] == "memory":
        from gistlib.models.memory import main as memory_main

        return memory_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command == "tour":
        from gistlib.course.tour import run_tour

        run_tour(num_gist_tokens=args.num_gist_tokens)
        return 0
    from gistlib.config import ConfigError

    try:
        commands = {"run": cmd_run, "train": cmd_train, "base": cmd_base, "report": cmd_report, "ship": cmd_ship}
        return commands[args.command](args)
    except ConfigError as err:
        print(f"gistlib {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
