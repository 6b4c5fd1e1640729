"""`vaultsh collect CONFIG`: run collection workers, on the dashboard or with printed progress.

- In a terminal: the dashboard starts the local workers as subprocesses and
  shows them live (vaultsh/dashboard).
- `--headless` or no terminal: one worker runs in this process with a
  progress printer; several workers run under the same supervisor the
  dashboard uses, with the printer fed by their events.
- `--events-fd N` (hidden): this process is one worker started by a launcher;
  its events go to fd N, nothing goes to the terminal.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import humanize

if TYPE_CHECKING:
    import threading


def run_collect(args) -> int:
    from collector.config import check_model_packages, load_config

    if args.store:
        os.environ["VAULTSH_STORE"] = args.store
    cfg = load_config(args.config)
    check_model_packages(cfg)
    if args.events_fd is not None:
        return _run_worker_for_launcher(args, cfg)
    machines = _machines(args, cfg)
    interactive = not args.headless and sys.stdin.isatty() and sys.stdout.isatty()
    if not interactive and len(machines) == 1:
        return _run_in_process(args, cfg, machines[0])
    return _run_supervised(args, cfg, machines, interactive)


def _machines(args, cfg) -> list[int]:
    from vaultsh.errors import UserError
    from vaultsh.supervise.spawn import parse_machines

    if args.machine is not None and args.machines is not None:
        raise UserError("give --machine or --machines, not both")
    if args.machine is not None:
        if not 0 <= args.machine < cfg.num_runs:
            raise UserError(
                f"--machine: {args.machine} is out of range for num_runs {cfg.num_runs} (0-{cfg.num_runs - 1})"
            )
        return [args.machine]
    if args.machines is not None:
        return parse_machines(args.machines, cfg.num_runs)
    return list(range(cfg.num_runs))


def _run_worker_for_launcher(args, cfg) -> int:
    """Launched by the dashboard/a launcher: events go to the channel, logs to stderr (a log file)."""
    from collector.worker import StopFlag, install_signal_handlers, run_worker
    from vaultsh.events import EventSink

    machine = args.machine if args.machine is not None else 0
    stop = StopFlag()
    sink = EventSink(machine, fd=args.events_fd)
    install_signal_handlers(stop)
    result = run_worker(cfg, machine, sink=sink, stop=stop, force=args.force)
    return 0 if result["status"] in ("complete", "stopped") else 1


def _run_in_process(args, cfg, machine: int) -> int:
    """One worker in this process, progress printed (scripts, clusters, `--headless`)."""
    from collector.worker import StopFlag, install_signal_handlers, run_worker
    from vaultsh.events import EventSink
    from vaultsh.progress import HeadlessPrinter

    stop = StopFlag()
    with HeadlessPrinter() as printer:
        sink = EventSink(machine, callback=printer)
        install_signal_handlers(
            stop,
            on_first=lambda: printer.console.log(
                "stopping after the megabatch in flight (press Ctrl-C again to abort)"
            ),
        )
        result = run_worker(cfg, machine, sink=sink, stop=stop, force=args.force)
    print(_result_line(machine, result, f"{cfg.storage.uri.rstrip('/')}/{cfg.run_name}"))
    return 0 if result["status"] in ("complete", "stopped") else 1


def _result_line(machine: int, result: dict, where: str) -> str:
    """The one line a headless worker ends with; a shard finished earlier says so."""
    totals = (
        f"{result['batches']} batches, {humanize.intcomma(result['tokens'])} tokens, "
        f"{result['megabatches']} megabatches committed"
    )
    if result.get("already_complete"):
        return f"worker {machine}: already complete: {totals}; nothing to do -> {where}"
    return f"worker {machine}: {result['status']}: {totals} in {humanize.naturaldelta(result['elapsed'])} -> {where}"


def _check_before_launch(cfg) -> None:
    """Refuse a bad hook or layer here, once, before any worker starts (reads the model's config only)."""
    from collector.config import read_model_facts, validate_against_model

    validate_against_model(cfg, read_model_facts(cfg.model))


def plan_lines(cfg) -> list[str]:
    """The first lines of `vaultsh plan`'s summary for the run summary; a plan that cannot be made never stops a
    collection."""
    from vaultsh.plan import summary_lines

    try:
        return [str(line) for line in summary_lines(cfg)][:4]
    except Exception:  # noqa: BLE001 - an estimate must not block the real run
        return []


def _run_supervised(args, cfg, machines: list[int], interactive: bool) -> int:
    from vaultsh.store import open_store
    from vaultsh.supervise import RunInfo, Supervisor
    from vaultsh.supervise.spawn import collect_launcher, default_concurrency, gpu_count, log_dir_for

    _check_before_launch(cfg)
    gpus = gpu_count()
    concurrency = args.workers or default_concurrency(len(machines), gpus=gpus)
    log_dir = log_dir_for(cfg.run_name, args.log_dir)
    store_uri = open_store(cfg.storage.uri).child_uri(cfg.run_name)
    info = RunInfo(
        run=cfg.run_name,
        model=cfg.model.name,
        hooks=list(cfg.upload.hooks),
        store=store_uri,
        config=str(args.config),
        num_runs=cfg.num_runs,
    )
    launcher = collect_launcher(args.config, log_dir, store=args.store, force=args.force, gpus=gpus)
    if interactive:
        sup = Supervisor(launcher, machines, concurrency, info=info)
        return _dashboard(sup, log_dir, lambda: plan_lines(cfg))
    return _headless(launcher, machines, concurrency, info, log_dir)


def fill_plan_later(sup, make_lines) -> threading.Thread:
    """`sup.set_plan(make_lines())` on a thread: the plan summary (seconds when torch is imported
    cold) never delays the workers; the dashboard shows it once it is there."""
    import threading

    def fill() -> None:
        sup.set_plan(make_lines())

    t = threading.Thread(target=fill, name="vaultsh-plan-summary", daemon=True)
    t.start()
    return t


def _dashboard(sup, log_dir, make_plan_lines=None) -> int:
    from vaultsh.dashboard.app import Dashboard

    sup.start()
    if make_plan_lines is not None:
        fill_plan_later(sup, make_plan_lines)
    app = Dashboard(sup, mode="collect")
    code = app.run()
    detached = sup.running()
    _print_summary(sup, log_dir, detached=detached)
    return int(code or 0) if not detached else 0


def _headless(launcher, machines, concurrency, info, log_dir) -> int:
    import signal

    from vaultsh.progress import HeadlessPrinter
    from vaultsh.supervise import Supervisor

    with HeadlessPrinter() as printer:
        sup = Supervisor(launcher, machines, concurrency, info=info, on_event=printer)
        asked = {"n": 0}

        def on_signal(signum, frame):
            asked["n"] += 1
            if asked["n"] == 1:
                printer.console.log("stopping after the megabatch in flight (press Ctrl-C again to abort)")
            sup.stop(None)  # a second request makes the workers leave at once

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            printer.console.log(f"{len(machines)} worker(s), {concurrency} at a time; logs in {log_dir}/")
            sup.start()
            last_seq = 0
            while True:
                finished = sup.wait(timeout=0.5)
                for line in sup.logs_since(last_seq):  # the printer shows the workers' own events
                    last_seq = line.seq
                    if line.origin == "supervisor":
                        printer.console.log(line.message)
                if finished:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    _print_summary(sup, log_dir)
    return sup.exit_code()


def _print_summary(sup, log_dir, detached: bool = False) -> None:
    """One line per worker and a total, after the run (or when the dashboard closes)."""
    totals = sup.totals()
    for w in sup.snapshot():
        extra = f" ({w.last_error})" if w.last_error and w.state == "failed" else ""
        print(
            f"worker {w.index}: {w.state}{extra}: {w.batches} batches, {humanize.intcomma(w.tokens)} tokens, "
            f"{w.committed} megabatches committed"
        )
    verb = "still running (detached)" if detached else "total"
    print(
        f"{verb}: {humanize.intcomma(totals.tokens)} tokens, {totals.committed} megabatches, "
        f"{humanize.naturalsize(totals.committed_bytes)} in {humanize.naturaldelta(totals.elapsed)} "
        f"-> {sup.info.store}  (logs: {log_dir}/)"
    )


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    import argparse

    p.add_argument(
        "config",
        help="YAML config: Activault's schema, the refusal-circuit model: form, or the "
        "LM-training dataset_config: block (see docs/data.md). A rerun resumes each "
        "worker after its last commit; a finished one says so and exits 0",
    )
    p.add_argument("--headless", action="store_true", help="print progress instead of opening the dashboard")
    p.add_argument("--machine", type=int, default=None, metavar="I", help="run only worker I of num_runs")
    p.add_argument(
        "--machines",
        default=None,
        metavar="SPEC",
        help="worker indices to run, e.g. 0-3 or 0,2,5 (default: all of num_runs)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="local workers at a time (default: one per GPU, on CPU one per 8 cores; at most num_runs)",
    )
    p.add_argument("--store", default=None, metavar="URI", help="override the config's storage URI")
    p.add_argument("--force", action="store_true", help="continue a run even if its config changed")
    p.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help="where worker logs go (default: ./.vaultsh/logs; one folder per run)",
    )
    p.add_argument("--events-fd", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    if args.workers is not None and args.workers < 1:
        from vaultsh.errors import UserError

        raise UserError(f"--workers: {args.workers} is not allowed (use 1 or more)")
    return run_collect(args)
