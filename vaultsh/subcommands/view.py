"""`vaultsh view FILE BATCH --heat (--norm | --dim D | --sae CKPT --feature F) [--png OUT]`."""

from __future__ import annotations

import argparse

from vaultsh.subcommands.explore_common import add_json, add_value_args, emit, open_uri, value_from_args


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("uri", help="a megabatch file (s3://bucket/run/hook/w0000--0000000.safetensors or a local path)")
    p.add_argument("batch", type=int, help="the sequence in the megabatch (negative counts from the end)")
    p.add_argument("--heat", action="store_true", help="colour each token by a value (the only view here)")
    add_value_args(p, norm=True)
    p.add_argument("--png", default=None, metavar="FILE", help="also write the picture as a PNG")
    add_json(p)
    return p


def run(args) -> int:
    from vaultsh.errors import UserError
    from vaultsh.explore.heat import heat

    if not args.heat:
        raise UserError("vaultsh view: give --heat (the plain text view is `vaultsh s3 URI -c 'view FILE N'`)")
    store, key = open_uri(args.uri)
    if not store.exists(key):  # a local file opens the store holding its run; its key is below the run
        import posixpath

        key = posixpath.join(key, posixpath.basename(args.uri.rstrip("/"))) if key else posixpath.basename(args.uri)
    if not store.exists(key):
        raise UserError(f"{args.uri}: no such megabatch file")
    return emit(heat(store, key, args.batch, value_from_args(args), png=args.png), args.json)
