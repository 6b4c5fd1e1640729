"""`vaultsh grep URI PATTERN`: find text in a run's decoded tokens (reads only input_ids and mask)."""

from __future__ import annotations

import argparse

from vaultsh.subcommands import options
from vaultsh.subcommands.explore_common import add_json, emit, explore


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("uri", help="a run, a hook directory, or a prefix holding runs (s3://... or a local path)")
    p.add_argument("pattern", help="the text to find (a regular expression with --regex)")
    p.add_argument("--regex", action="store_true", help="PATTERN is a Python regular expression")
    p.add_argument("-i", "--ignore-case", action="store_true", help="ignore case")
    p.add_argument("--hook", default=None, help="search this hook's files (default: each run's first hook)")
    p.add_argument("-n", dest="limit", type=int, default=50, metavar="N", help="stop after N matches (default 50)")
    p.add_argument("--context", type=int, default=8, metavar="K", help="tokens of context either side (default 8)")
    add_json(p)
    return p


def run(args) -> int:
    from vaultsh.explore.grep import grep

    r = explore(
        args,
        "grep",
        grep,
        args.pattern,
        context_tokens=args.context,
        **options(args, "regex", "hook", "limit", "ignore_case"),
    )
    return emit(r, args.json)
