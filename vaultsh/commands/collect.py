"""`vaultsh collect CONFIG`: run collection workers (headless printer for now)."""

from __future__ import annotations

import os
import sys

import humanize


def run_collect(args) -> int:
    from collector.config import load_config
    from collector.events import EventSink
    from collector.worker import StopFlag, install_signal_handlers, run_worker
    from vaultsh.progress import HeadlessPrinter

    if args.store:
        os.environ["VAULTSH_STORE"] = args.store
    cfg = load_config(args.config)
    machine = args.machine if args.machine is not None else 0
    if args.machine is None and cfg.num_runs > 1:
        print(f"vaultsh: num_runs is {cfg.num_runs}: running worker 0 only (use --machine I for the others)", file=sys.stderr)
    stop = StopFlag()

    if args.events_fd is not None:
        # Launched by the dashboard/a launcher: events go to the channel, logs to stderr (a log file).
        sink = EventSink(machine, fd=args.events_fd)
        install_signal_handlers(stop)
        result = run_worker(cfg, machine, sink=sink, stop=stop, force=args.force)
        return 0 if result["status"] in ("complete", "stopped") else 1

    if not args.headless and sys.stdout.isatty():
        print("vaultsh: the dashboard is not built yet (issue #6): showing headless progress", file=sys.stderr)
    with HeadlessPrinter() as printer:
        sink = EventSink(machine, callback=printer)
        install_signal_handlers(stop, on_first=lambda: printer.console.log(
            "stopping after the megabatch in flight (press Ctrl-C again to abort)"))
        result = run_worker(cfg, machine, sink=sink, stop=stop, force=args.force)
    print(
        f"worker {machine}: {result['status']}: {result['batches']} batches, {humanize.intcomma(result['tokens'])} tokens, "
        f"{result['megabatches']} megabatches committed in {humanize.naturaldelta(result['elapsed'])} "
        f"-> {cfg.storage.uri.rstrip('/')}/{cfg.run_name}"
    )
    return 0 if result["status"] in ("complete", "stopped") else 1


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    import argparse

    p.add_argument("config", help="YAML config (Activault schema or ours)")
    p.add_argument("--headless", action="store_true", help="print progress instead of opening the dashboard")
    p.add_argument("--machine", type=int, default=None, metavar="I", help="run only worker I of num_runs")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="local workers to start (default: 1)")
    p.add_argument("--store", default=None, metavar="URI", help="override the config's storage URI")
    p.add_argument("--force", action="store_true", help="continue a run even if its config changed")
    p.add_argument("--events-fd", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    return run_collect(args)
