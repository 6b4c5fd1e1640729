"""`vaultsh top URI (--dim D | --direction FILE | --sae CKPT --feature F)`: exact top-k tokens with contexts."""

from __future__ import annotations

import argparse

from vaultsh.subcommands.explore_common import add_json, add_value_args, emit, open_uri, progress, value_from_args


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("uri", help="a hook directory, or a run with --hook (s3://... or a local path)")
    p.add_argument("--hook", default=None, help="the hook, when URI is a run")
    add_value_args(p)
    p.add_argument("-k", type=int, default=20, help="how many tokens (default 20)")
    p.add_argument("--context", type=int, default=8, metavar="K", help="tokens of context either side (default 8)")
    p.add_argument("--files", type=int, default=None, metavar="N", help="a seeded random sample of N files")
    add_json(p)
    return p


def run(args) -> int:
    from vaultsh.explore.top import top

    store, key = open_uri(args.uri)
    vf = value_from_args(args)
    with progress("top") as cb:
        r = top(store, key, args.hook, vf, k=args.k, context_tokens=args.context, files=args.files, progress=cb)
    return emit(r, args.json)
