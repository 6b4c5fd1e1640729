"""`vaultsh verify RUN_URI`: check every committed megabatch of a run (or, given an export's OUT, its shards).

Exit status: 0 when everything checks out, 1 when problems were found (listed
on one screen; `--json` gives them all), 2 for a usage or store error.
"""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument(
        "uri",
        help="a run (s3://bucket/run or a path), one hook directory of it, a prefix holding runs, "
        "or the OUT of a vaultsh export",
    )
    p.add_argument(
        "--nan", action="store_true", help="also scan every file's states for NaN/Inf (reads the states again)"
    )
    from vaultsh.store import add_no_sign_request

    add_no_sign_request(p)
    p.add_argument("--json", action="store_true", help="machine-readable report with every problem")
    p.add_argument("--threads", type=int, default=4, metavar="N", help="files checked in parallel (default 4)")


def run(args) -> int:
    from rich.console import Console

    from vaultsh.errors import UserError
    from vaultsh.export.check import check_export, holds_export
    from vaultsh.store import open_location, open_store
    from vaultsh.terminal import inert
    from vaultsh.verify import ProblemReport, verify

    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: use a whole number >= 1")
    store, key = open_location(args.uri)
    err = Console(stderr=True, highlight=False)
    report: ProblemReport
    if holds_export(store, key):  # an export's OUT: its shards, not megabatches
        report = check_export(open_store(args.uri, create=False))
    elif args.json or not err.is_terminal:
        report = verify(store, key, nan=args.nan, threads=args.threads)
    else:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(
            TextColumn("verifying"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err, transient=True
        ) as prog:
            task = prog.add_task("verify", total=None)
            report = verify(
                store,
                key,
                nan=args.nan,
                threads=args.threads,
                progress=lambda done, total: prog.update(task, completed=done, total=total),
            )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        out = Console(highlight=False, soft_wrap=True)
        for style, line in report.lines():
            out.print(inert(line), style=style or None, markup=False, emoji=False)
    sys.stdout.flush()
    return report.exit_code
