"""`vaultsh inspect URI`: a run, a hook directory, a megabatch or a JSON file.

A megabatch gets the shell's `inspect` (vaultsh/shell/commands.py), the same
header view, states check and decoded first sequences as `vaultsh s3`'s, minus
the interactive batch viewer.
"""

from __future__ import annotations

import argparse
import json
import posixpath
from typing import TYPE_CHECKING

from vaultsh.errors import NotFoundError, UserError
from vaultsh.store import open_location
from vaultsh.terminal import inert

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console, JustifyMethod

_JSON_LIMIT = 1 << 20


def _safe(text) -> str:
    """Untrusted text (keys, hook names, header metadata) made inert for the terminal:
    rich markup escaped, control characters (ANSI escapes included) shown as \\xNN."""
    from rich.markup import escape

    return escape(inert(text))


def run_inspect(args) -> int:
    from rich.console import Console

    store, key = open_location(args.uri)
    console = Console()
    as_prefix = str(args.uri).endswith("/")  # `s3://b/run/` names a prefix, never an object
    if key and not as_prefix and store.exists(key):
        if key.endswith(".json"):
            return _show_json(store, key, console)
        return _show_megabatch(store, key, as_json=args.json, scan=not args.no_scan)
    return _show_prefix(store, key, console, as_json=args.json)


def _show_megabatch(store, key: str, as_json: bool, scan: bool) -> int:
    """The shell's `inspect` (header, states check, decoded text), run once without the batch viewer."""
    from vaultsh.shell.app import Shell

    shell = Shell(store=store, cwd=posixpath.dirname(key), json_mode=as_json, interactive=False)
    return shell.dispatch(["inspect", "/" + key] + ([] if scan else ["--no-scan"]))


def _show_json(store, key: str, console: Console) -> int:
    import humanize

    info = store.head(key)
    if info.size > _JSON_LIMIT:
        raise UserError(f"{store.child_uri(key)}: {humanize.naturalsize(info.size)} is too large to print (limit 1 MB)")
    try:
        data = json.loads(store.get_bytes(key))
    except ValueError as exc:
        raise UserError(f"{store.child_uri(key)}: not valid JSON ({exc})") from None
    console.print_json(data=data)
    return 0


def _show_prefix(store, key: str, console: Console, as_json: bool) -> int:
    from rich.console import Console

    from vaultsh.run import METADATA, Run, megabatch_format

    key = key.strip("/")
    listing = store.list_dir(key + "/" if key else "")
    if not listing.prefixes and not listing.objects:
        raise NotFoundError(f"{store.child_uri(key)}: nothing stored there")
    if not key:  # a bucket (or store) root: what lies there
        return _show_listing(store, key, listing, console, as_json)
    names = {o.name for o in listing.objects}
    is_hook = METADATA in names or any(megabatch_format(n) for n in names)
    if is_hook and "/" in key:
        run_name, hook = posixpath.split(key)
        return _show_hook(Run(store, run_name), hook, store, console, as_json)
    run = Run(store, key)
    summary = run.summary()
    if not summary.hooks:  # not a run: show what lies there instead
        if not as_json:
            Console(stderr=True).print("[yellow]no hook directories here: not a run, showing its listing[/]")
        return _show_listing(store, key, listing, console, as_json)
    if as_json:
        out = {"uri": store.child_uri(key), **summary.to_dict()}
        if any(h.uncommitted for h in summary.hooks.values()):
            commits = run.iter_commits()  # a diagnostic: name the files readers will ignore
            for hook, h in out["hooks"].items():
                h["uncommitted_files"] = (
                    [store.child_uri(o.key) for o in run.uncommitted_files(hook, commits)] if h["uncommitted"] else []
                )
        print(json.dumps(out, indent=2, default=str))
        return 0
    _print_summary(store, key, summary, console)
    return 0


def _show_listing(store, key: str, listing, console: Console, as_json: bool) -> int:
    import humanize

    uri = store.child_uri(key) if key else store.uri
    if as_json:
        out = {
            "uri": uri,
            "prefixes": [store.child_uri(p) + "/" for p in listing.prefixes],
            "objects": [{"key": o.key, "uri": store.child_uri(o.key), "size": o.size} for o in listing.objects],
        }
        print(json.dumps(out, indent=2, default=str))
        return 0
    np_, no = len(listing.prefixes), len(listing.objects)
    console.print(f"[bold]{_safe(uri)}[/]: {np_} prefix{'es' if np_ != 1 else ''}, {no} object{'s' if no != 1 else ''}")
    for p in listing.prefixes:
        console.print(f"  {_safe(p[len(key) + 1 if key else 0 :])}", highlight=False)
    for o in listing.objects:
        console.print(f"  {_safe(o.name)}  {humanize.naturalsize(o.size, binary=True)}", highlight=False)
    return 0


def _print_summary(store, key, summary, console: Console) -> None:
    import humanize
    from rich.table import Table

    console.print(f"[bold]run[/] {_safe(store.child_uri(key))}", soft_wrap=True)
    table = Table()
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("hook", "left"),
        ("committed", "right"),
        ("size", "right"),
        ("tokens", "right"),
        ("uncommitted", "right"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for h in summary.hooks.values():
        table.add_row(
            _safe(h.hook),
            f"{h.megabatches:,}",
            humanize.naturalsize(h.bytes, binary=True),
            f"{h.tokens:,}",
            str(h.uncommitted or ""),
        )
    table.add_row(
        "[bold]total[/]",
        f"{summary.files:,} files",
        humanize.naturalsize(summary.bytes, binary=True),
        f"{summary.tokens:,}",
        "",
        end_section=True,
    )
    console.print(table)


def _show_hook(run, hook: str, store, console: Console, as_json: bool) -> int:
    import humanize
    from rich.table import Table

    commits = run.iter_commits()
    files = run.committed_files(hook, commits)
    if as_json:
        print(json.dumps([{**f.to_dict(), "uri": store.child_uri(f.key)} for f in files], indent=2, default=str))
        return 0
    console.print(
        f"{_safe(store.child_uri(run.name))}/{_safe(hook)}: {len(files)} committed megabatches", soft_wrap=True
    )
    table = Table()
    for col in ("#", "file", "size", "tokens", "worker"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for i, f in enumerate(files):
        table.add_row(
            str(i),
            _safe(posixpath.basename(f.key)),
            humanize.naturalsize(f.size, binary=True),
            f"{f.n_tokens:,}",
            "" if f.worker is None else str(f.worker),
        )
    console.print(table)
    stray = run.uncommitted_files(hook, commits)
    if stray:
        names = ", ".join(_safe(o.name) for o in stray[:10]) + (", ..." if len(stray) > 10 else "")
        console.print(f"[yellow]{len(stray)} uncommitted (readers ignore them):[/] {names}")
    return 0


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument("uri", help="run, hook directory or megabatch file (s3://... or a path)")
    from vaultsh.store import add_no_sign_request

    add_no_sign_request(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--no-scan",
        action="store_true",
        help="megabatch: skip the states check (NaN/Inf, value range), which reads every byte of the states",
    )
    p.add_argument("--scan", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts


def run(args) -> int:
    return run_inspect(args)
