"""`vaultsh finalize RUN_URI`: merge every worker's statistics and record the run's totals."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument("run_uri", metavar="RUN_URI", help="the run: s3://BUCKET/[PREFIX/]RUN or a local directory")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="ignore the workers' statistics snapshots and recompute from the stored files",
    )
    p.add_argument("--dry-run", action="store_true", help="compute and show, write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from vaultsh.finalize import finalize, open_run, summary_lines

    report = finalize(open_run(args.run_uri), recompute=args.recompute, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(summary_lines(report, dry_run=args.dry_run)))
    return 0
