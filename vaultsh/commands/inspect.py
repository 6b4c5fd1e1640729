"""`vaultsh inspect URI`: a run, a hook directory, a megabatch or a JSON file."""

from __future__ import annotations

import json
import posixpath
import sys

import humanize
from rich.console import Console
from rich.table import Table

from vaultsh.errors import NotFoundError, UserError
from vaultsh.store import open_location

_JSON_LIMIT = 1 << 20


def run_inspect(args) -> int:
    store, key = open_location(args.uri)
    console = Console()
    if key and store.exists(key):
        if key.endswith(".json"):
            return _show_json(store, key, console)
        return _show_megabatch(store, key, console, as_json=args.json, scan=args.scan)
    return _show_prefix(store, key, console, as_json=args.json)


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
    console.print(f"[bold]Megabatch[/] {report['uri']}")
    console.print(f"  format: {header.format}   model: {header.model or '?'}   hook: {header.hook or '?'}")
    if header.file_size is not None:
        console.print(f"  size: {humanize.naturalsize(header.file_size, binary=True)} ({header.file_size:,} bytes)")
    console.print("  tensors:")
    for name, t in header.tensors.items():
        console.print(f"    {name}: {list(t.shape)} {t.dtype}")
    extra = {k: v for k, v in header.metadata.items() if k not in ("model", "hook")}
    if extra:
        console.print("  metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    if scan:
        s = report["scan"]
        ok = lambda n: "✅" if n == 0 else f"❌ ({n:,})"  # noqa: E731
        console.print("  states check:")
        console.print(f"    No NaNs: {ok(s['nan_count'])}   No Infs: {ok(s['inf_count'])}")
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
    from vaultsh.run import Run

    key = key.strip("/")
    listing = store.list_dir(key + "/" if key else "")
    if not listing.prefixes and not listing.objects:
        raise NotFoundError(f"{store.child_uri(key)}: nothing stored there")
    names = {o.name for o in listing.objects}
    if "metadata.json" in names and "/" in key:
        run_name, hook = posixpath.split(key)
        return _show_hook(Run(store, run_name), hook, store, console, as_json)
    run = Run(store, key)
    summary = run.summary()
    if as_json:
        print(json.dumps({"uri": store.child_uri(key), **summary.to_dict()}, indent=2, default=str))
        return 0
    _print_summary(store, key, summary, console)
    return 0


def _print_summary(store, key, summary, console: Console) -> None:
    table = Table(title=f"run {store.child_uri(key)}", title_justify="left")
    for col, justify in (("hook", "left"), ("committed", "right"), ("size", "right"), ("tokens", "right"), ("uncommitted", "right")):
        table.add_column(col, justify=justify)
    for h in summary.hooks.values():
        table.add_row(h.hook, f"{h.megabatches:,}", humanize.naturalsize(h.bytes, binary=True), f"{h.tokens:,}", str(h.uncommitted or ""))
    table.add_row("[bold]total[/]", f"{summary.files:,} files", humanize.naturalsize(summary.bytes, binary=True), f"{summary.tokens:,}", "", end_section=True)
    console.print(table)
    if not summary.hooks:
        console.print("[yellow]no hook directories found: is this a run?[/]", file=sys.stderr)


def _show_hook(run, hook: str, store, console: Console, as_json: bool) -> int:
    files = run.committed_files(hook)
    if as_json:
        print(json.dumps([f.to_dict() for f in files], indent=2, default=str))
        return 0
    table = Table(title=f"{store.child_uri(run.name)}/{hook}: {len(files)} committed megabatches", title_justify="left")
    for col in ("#", "file", "size", "tokens", "worker"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for i, f in enumerate(files):
        table.add_row(str(i), posixpath.basename(f.key), humanize.naturalsize(f.size, binary=True), f"{f.n_tokens:,}", "" if f.worker is None else str(f.worker))
    console.print(table)
    return 0
