"""`vaultsh norms URI`: token-norm distribution, massive dims, outlier tokens; writes RUN/_vaultsh/outliers/HOOK.json."""

from __future__ import annotations

import argparse

from vaultsh.subcommands import options
from vaultsh.subcommands.explore_common import add_json, emit, explore


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("uri", help="a hook directory, or a run with --hook")
    p.add_argument("--hook", default=None, help="the hook, when URI is a run")
    p.add_argument("--png", default=None, metavar="FILE", help="also draw the histogram and the by-position curve")
    p.add_argument("--factor", type=float, default=5.0, help="outlier: norm >= FACTOR x the median (default 5)")
    p.add_argument(
        "--massive-ratio", type=float, default=10.0, help="massive dim: max|x| >= RATIO x the median dim's (default 10)"
    )
    p.add_argument("--files", type=int, default=None, metavar="N", help="a seeded random sample of N files")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not write the outliers file")
    add_json(p)
    return p


def run(args) -> int:
    from vaultsh.explore.norms import norms

    r = explore(args, "norms", norms, args.hook, **options(args, "factor", "massive_ratio", "files", "write"))
    if args.png:
        from vaultsh.explore.png import histogram_png

        histogram_png(r.hist_edges, r.hist_counts, r.by_position, f"{r.run}/{r.hook}", args.png)
    return emit(r, args.json)
