"""Command line: `python -m gistlib <command>`."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; never stall on it
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="gistlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="tiny model, gist mask, canonical prefix, exact-caching check")
    tour.add_argument("--num-gist-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "tour":
        from gistlib.tour import run_tour

        run_tour(num_gist_tokens=args.num_gist_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
