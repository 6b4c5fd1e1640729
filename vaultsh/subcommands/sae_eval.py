"""`vaultsh sae-eval URI CKPT`: L0, FVU, dead and dense latents of an SAE on a hook's stored tokens."""

from __future__ import annotations

import argparse

from vaultsh.subcommands.explore_common import add_json, emit, explore


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("uri", help="a hook directory, or a run with --hook")
    p.add_argument("ckpt", help="SAE checkpoint: a SAELens or sparsify directory (safetensors; pickles refused)")
    p.add_argument("--hook", default=None, help="the hook, when URI is a run")
    p.add_argument("--tokens", type=int, default=100_000, metavar="N", help="real tokens to use (default 100000)")
    p.add_argument(
        "--dense",
        type=float,
        default=0.1,
        metavar="F",
        help="a latent active on more than this fraction of tokens is dense (default 0.1)",
    )
    add_json(p)
    return p


def run(args) -> int:
    from vaultsh.explore.saeeval import sae_eval

    r = explore(args, "sae-eval", sae_eval, args.hook, args.ckpt, tokens=args.tokens, dense=args.dense)
    return emit(r, args.json)
