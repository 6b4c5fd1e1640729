"""`vaultsh watch RUN_URI`: the dashboard, read-only, over a run written elsewhere (Slurm, Ray).

It polls the run's commit records (only new ones are read), so it works on
any store the workers write to, from any machine that can read it.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument("run_uri", metavar="RUN_URI", help="the run: s3://bucket/prefix/run_name or a local path")
    p.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between polls (default 5)")
    from vaultsh.store import add_no_sign_request

    add_no_sign_request(p)
    p.add_argument("--once", action="store_true", help="print the run's progress once and exit (no dashboard)")


def run(args) -> int:
    from vaultsh.errors import UserError
    from vaultsh.supervise.watcher import StoreWatcher

    if not args.interval > 0:
        raise UserError(f"--interval: {args.interval} is not allowed (use a number of seconds > 0)")
    watcher = StoreWatcher(args.run_uri, interval=args.interval)
    if args.once or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _print_once(watcher)
    from vaultsh.dashboard.app import Dashboard

    watcher.start()
    try:
        Dashboard(watcher, mode="watch").run()
    finally:
        watcher.close()
    return 0


def _print_once(watcher) -> int:
    import humanize

    watcher.started_at = watcher.clock()
    watcher.poll_once()
    info = watcher.info
    print(f"{info.run}  model {info.model or '?'}  hooks {', '.join(info.hooks) or '?'}")
    for w in watcher.snapshot():
        total = w.total_batches if w.total_batches is not None else "?"
        print(
            f"worker {w.index}: {w.state}: {w.batches}/{total} batches, {humanize.intcomma(w.tokens)} tokens, "
            f"{w.committed} megabatches, {humanize.naturalsize(w.committed_bytes)}"
        )
    t = watcher.totals()
    print(
        f"total: {humanize.intcomma(t.tokens)} tokens, {t.committed} megabatches, "
        f"{humanize.naturalsize(t.committed_bytes)} -> {info.store}"
    )
    return 0
