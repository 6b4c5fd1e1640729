"""`vaultsh inspect URI`: a run, a hook directory, a megabatch or a JSON file."""

from __future__ import annotations

import json
import posixpath

import humanize
from rich.console import Console
from rich.table import Table

from vaultsh.errors import FormatError, NotFoundError, UserError
from vaultsh.store import open_location

_JSON_LIMIT = 1 << 20


def _safe(text) -> str:
    """Untrusted text (keys, hook names, header metadata) made inert for the terminal:
    rich markup escaped, control characters (ANSI escapes included) shown as \\xNN."""
    from rich.markup import escape

    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)
    return escape(s)


def run_inspect(args) -> int:
    store, key = open_location(args.uri)
    console = Console()
    as_prefix = str(args.uri).endswith("/")  # `s3://b/run/` names a prefix, never an object
    if key and not as_prefix and store.exists(key):
        if key.endswith(".json"):
            return _show_json(store, key, console)
        try:
            return _show_megabatch(store, key, console, as_json=args.json, scan=args.scan)
        except FormatError as exc:
            raise _with_uri(exc, store, key) from None
    return _show_prefix(store, key, console, as_json=args.json)


def _with_uri(exc: FormatError, store, key: str) -> FormatError:
    """The megabatch reader names files by store key; a user typed a URI or a path: name that."""
    msg = str(exc)
    if msg.startswith(key + ":"):
        msg = store.child_uri(key) + msg[len(key):]
    elif store.child_uri(key) not in msg:
        msg = f"{store.child_uri(key)}: {msg}"
    return FormatError(msg)


def _show_json(store, key: str, console: Console) -> int:
    info = store.head(key)
    if info.size > _JSON_LIMIT:
        raise UserError(f"{store.child_uri(key)}: {humanize.naturalsize(info.size)} is too large to print (limit 1 MB)")
    try:
        data = json.loads(store.get_bytes(key))
    except ValueError as exc:
        raise UserError(f"{store.child_uri(key)}: not valid JSON ({exc})") from None
    console.print_json(data=data)
    return 0


def _show_megabatch(store, key: str, console: Console, as_json: bool, scan: bool) -> int:
    from vaultsh.megabatch import read_header, scan_states

    header = read_header(store, key)
    report = {"uri": store.child_uri(key), **header.to_dict()}
    if scan:
        report["scan"] = _scan(store, key, header, console, quiet=as_json, scan_states=scan_states)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    console.print(f"[bold]Megabatch[/] {_safe(report['uri'])}")
    console.print(f"  format: {header.format}   model: {_safe(header.model or '?')}   hook: {_safe(header.hook or '?')}")
    if header.file_size is not None:
        console.print(f"  size: {humanize.naturalsize(header.file_size, binary=True)} ({header.file_size:,} bytes)")
    console.print("  tensors:")
    for name, t in header.tensors.items():
        console.print(f"    {_safe(name)}: {list(t.shape)} {t.dtype}")
    extra = {k: v for k, v in header.metadata.items() if k not in ("model", "hook")}
    if extra:
        console.print("  metadata: " + ", ".join(f"{_safe(k)}={_safe(v)}" for k, v in sorted(extra.items())))
    if scan:
        s = report["scan"]
        ok = lambda n: "✅" if n == 0 else f"❌ ({n:,})"  # noqa: E731
        console.print("  states check:")
        console.print(f"    No NaNs: {ok(s['nan_count'])}   No Infs: {ok(s['inf_count'])}")
        if s["min"] is None:  # no finite value at all (or an empty megabatch)
            console.print("    Value range: no finite values")
        else:
            console.print(f"    Value range: [{s['min']:.4g}, {s['max']:.4g}]   mean {s['mean']:.4g}   std {s['std']:.4g}")
        console.print(f"    masked tokens: {s['masked_fraction']:.1%}")
    return 0


def _scan(store, key, header, console, quiet, scan_states) -> dict:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    if quiet:
        return scan_states(store, key, header)
    with Progress("scanning", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("scan", total=None)
        return scan_states(store, key, header, progress=lambda done, total: progress.update(task, completed=done, total=total))


def _show_prefix(store, key: str, console: Console, as_json: bool) -> int:
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
                h["uncommitted_files"] = [store.child_uri(o.key) for o in run.uncommitted_files(hook, commits)] if h["uncommitted"] else []
        print(json.dumps(out, indent=2, default=str))
        return 0
    _print_summary(store, key, summary, console)
    return 0


def _show_listing(store, key: str, listing, console: Console, as_json: bool) -> int:
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
        console.print(f"  {_safe(p[len(key) + 1 if key else 0:])}", highlight=False)
    for o in listing.objects:
        console.print(f"  {_safe(o.name)}  {humanize.naturalsize(o.size, binary=True)}", highlight=False)
    return 0


def _print_summary(store, key, summary, console: Console) -> None:
    console.print(f"[bold]run[/] {_safe(store.child_uri(key))}", soft_wrap=True)
    table = Table()
    for col, justify in (("hook", "left"), ("committed", "right"), ("size", "right"), ("tokens", "right"), ("uncommitted", "right")):
        table.add_column(col, justify=justify)
    for h in summary.hooks.values():
        table.add_row(_safe(h.hook), f"{h.megabatches:,}", humanize.naturalsize(h.bytes, binary=True), f"{h.tokens:,}", str(h.uncommitted or ""))
    table.add_row("[bold]total[/]", f"{summary.files:,} files", humanize.naturalsize(summary.bytes, binary=True), f"{summary.tokens:,}", "", end_section=True)
    console.print(table)


def _show_hook(run, hook: str, store, console: Console, as_json: bool) -> int:
    commits = run.iter_commits()
    files = run.committed_files(hook, commits)
    if as_json:
        print(json.dumps([{**f.to_dict(), "uri": store.child_uri(f.key)} for f in files], indent=2, default=str))
        return 0
    console.print(f"{_safe(store.child_uri(run.name))}/{_safe(hook)}: {len(files)} committed megabatches", soft_wrap=True)
    table = Table()
    for col in ("#", "file", "size", "tokens", "worker"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for i, f in enumerate(files):
        table.add_row(str(i), _safe(posixpath.basename(f.key)), humanize.naturalsize(f.size, binary=True), f"{f.n_tokens:,}", "" if f.worker is None else str(f.worker))
    console.print(table)
    stray = run.uncommitted_files(hook, commits)
    if stray:
        names = ", ".join(_safe(o.name) for o in stray[:10]) + (", ..." if len(stray) > 10 else "")
        console.print(f"[yellow]{len(stray)} uncommitted (readers ignore them):[/] {names}")
    return 0


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument("uri", help="run, hook directory or megabatch file (s3://... or a path)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--scan", action="store_true", help="also scan states for NaN/Inf and value range")


def run(args) -> int:
    return run_inspect(args)
