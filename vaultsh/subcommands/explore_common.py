"""What the explore subcommands (grep, top, sae-eval, view, norms) share: location, progress, output."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager


def open_uri(uri: str):
    """(store, key) for a URI: s3://bucket/run[/hook] or a local run, hook or store directory."""
    from vaultsh.shell.context import open_shell_location

    return open_shell_location(uri)


@contextmanager
def progress(what: str):
    """A rich progress bar on stderr when it is a terminal; yields the `(done, total)` callback."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True
    ) as prog:
        task = prog.add_task(what, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def explore(args, what: str, fn, *positional, **options):
    """`fn(store, key, *positional, **options)` over `args.uri`, under a progress bar named `what`: its result."""
    store, key = open_uri(args.uri)
    with progress(what) as cb:
        return fn(store, key, *positional, progress=cb, **options)


def emit(result, as_json: bool) -> int:
    """Print a result: JSON for scripts, else text for people."""
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False, default=str) + "\n")
        return 0
    from rich.console import Console

    from vaultsh.explore.render import render

    render(result, Console())
    return 0


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    from vaultsh.store import add_no_sign_request

    add_no_sign_request(p)


def add_value_args(p: argparse.ArgumentParser, norm: bool = False) -> None:
    g = p.add_argument_group("value (exactly one)")
    if norm:
        g.add_argument("--norm", action="store_true", help="the token's norm")
    g.add_argument("--dim", type=int, default=None, metavar="D", help="dimension D")
    g.add_argument("--direction", default=None, metavar="FILE", help="x . v, v from a .npy or .safetensors file")
    g.add_argument("--sae", default=None, metavar="CKPT", help="an SAE checkpoint (SAELens or sparsify, safetensors)")
    g.add_argument("--feature", type=int, default=None, metavar="F", help="the SAE latent")


def value_from_args(args):
    from vaultsh.explore.values import value_fn

    return value_fn(
        dim=args.dim,
        direction=args.direction,
        sae=args.sae,
        feature=args.feature,
        norm=bool(getattr(args, "norm", False)),
    )
