"""`vaultsh launch ray|slurm CONFIG --workers N --start I --end J`: one worker per index on a cluster."""

from __future__ import annotations

import sys

from vaultsh.subcommands import options


def _common(p, config_optional: bool = False) -> None:
    p.add_argument(
        "config",
        nargs="?" if config_optional else None,
        help="YAML config (its num_runs is the total number of workers)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="total number of workers; must equal the config's num_runs (default: num_runs)",
    )
    p.add_argument("--start", type=int, default=None, metavar="I", help="first worker index to launch (default 0)")
    p.add_argument(
        "--end", type=int, default=None, metavar="J", help="last worker index to launch, inclusive (default N-1)"
    )
    p.add_argument("--store", default=None, metavar="URI", help="override the config's storage URI")
    p.add_argument("--force", action="store_true", help="let workers continue a run whose config changed")


# The flags that set a SlurmOptions field of the same name: (name, type, metavar, help). None means "not given":
# the config's slurm: block decides, else the default.
_SLURM_FLAGS = (
    ("partition", str, None, None),
    ("account", str, None, None),
    ("qos", str, None, None),
    ("constraint", str, None, "node features, e.g. a100&ib"),
    ("time", str, None, "time limit, e.g. 48:00:00"),
    ("gpus", int, None, "GPUs per worker (default 1)"),
    ("mem", str, None, "memory per worker (default 250G)"),
    ("cpus", int, None, "CPUs per worker (default 16)"),
    ("setup", str, "LINE", "one shell line run before the worker, e.g. 'module load cuda; source ~/venv/bin/activate'"),
)


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    sub = p.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)
    r = sub.add_parser(
        "ray",
        help="run workers as Ray tasks on an existing (or a new local) Ray cluster",
        description="Run one worker per index as a Ray task; failed workers are retried and resume.",
    )
    _common(r)
    r.add_argument(
        "--resources",
        default='{"CPU": 1}',
        metavar="JSON",
        help='resources of each worker, e.g. \'{"CPU": 32, "GPU": 2}\' (CPU, GPU, memory or custom)',
    )
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    r.add_argument("--wait", action="store_true", help="wait for every worker, showing their progress here")
    r.add_argument(
        "--retries", type=int, default=2, metavar="N", help="resubmit a failed worker up to N times (default 2)"
    )
    s = sub.add_parser(
        "slurm",
        help="write sbatch scripts (one per index, or an array job), submit and follow them",
        description="Write sbatch scripts and submit them when sbatch exists; records index -> job id. "
        "Resources default to the config's slurm: block, then to --gpus 1 --mem 250G --cpus 16.",
    )
    _common(s, config_optional=True)
    for name, type_, metavar, help_text in _SLURM_FLAGS:
        s.add_argument(f"--{name}", type=type_, default=None, metavar=metavar, help=help_text)
    s.add_argument("--array", action="store_true", help="one array job instead of one job per index")
    s.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPT",
        help="another #SBATCH option, e.g. --exclusive (repeatable)",
    )
    s.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where scripts, logs, events and jobs.json go (default ./slurm/RUN_NAME)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the scripts; write and submit nothing")
    s.add_argument("--wait", action="store_true", help="follow the jobs until done: progress, Slurm states, failures")
    s.add_argument(
        "--status",
        default=None,
        metavar="RUN",
        help="show which indices are pending, running, done or failed (RUN: the --out directory, "
        "its jobs.json, the config or the run name); with --wait, follow them",
    )
    s.add_argument("--resubmit-failed", default=None, metavar="RUN", help="resubmit only the failed indices of RUN")
    s.add_argument(
        "--interval", type=float, default=5.0, metavar="S", help="seconds between polls with --wait (default 5)"
    )


def run(args) -> int:
    from vaultsh.errors import UserError
    from vaultsh.launch.common import make_plan

    if args.launcher == "slurm" and (args.status or args.resubmit_failed):
        return _slurm_existing(args)
    if args.config is None:
        raise UserError("give a config (or --status RUN / --resubmit-failed RUN)")
    plan = make_plan(
        args.config, workers=args.workers, start=args.start, end=args.end, store=args.store, force=args.force
    )
    if args.launcher == "slurm":
        return _slurm(plan, args)
    return _ray(plan, args)


def _slurm(plan, args) -> int:
    from pathlib import Path

    from vaultsh.launch import slurm

    opts = slurm.options_from(
        plan.config.slurm,
        plan.config.source,
        **options(args, *(name for name, *_ in _SLURM_FLAGS)),
        array=args.array or None,
        extra=list(args.sbatch),
        out_dir=Path(args.out).expanduser() if args.out else None,
    )
    _check_interval(args)
    jobs = slurm.build_jobs(plan, opts)
    if args.dry_run:
        for job in jobs:
            print(f"# ---- {job.path}")
            print(job.text, end="")
        return 0
    slurm.write_jobs(jobs)
    sbatch = slurm.find_sbatch()
    if sbatch is None:
        print(
            f"sbatch not found: wrote {len(jobs)} script(s) to {jobs[0].path.parent}; submit them on the cluster with:"
        )
        for job in jobs:
            print(f"  sbatch {job.path}")
        return 0
    record_path = jobs[0].path.parent / "jobs.json"
    try:
        slurm.submit(jobs, sbatch)
    finally:
        if any(j.job_id for j in jobs):
            slurm.write_job_map(plan, jobs)
            print(f"index -> job id map: {record_path}")
    for i, job_id in slurm.job_map(jobs).items():
        print(f"  worker {i}: job {job_id}")
    print(
        f"submitted {len(plan.indices)} worker(s) of {plan.run_name} -> {plan.store_uri}; "
        f"logs in {jobs[0].path.parent / 'logs'}"
    )
    if not args.wait:
        print(f"follow with: vaultsh launch slurm --status {record_path.parent} --wait")
        return 0
    from vaultsh.launch.slurmstate import LaunchRecord

    return _follow(LaunchRecord.load(record_path), plan.indices, args.interval)


def _check_interval(args) -> None:
    from vaultsh.errors import UserError

    if not args.interval > 0:
        raise UserError(f"--interval: {args.interval} is not allowed (use a number of seconds > 0)")


def _slurm_existing(args) -> int:
    """--status RUN [--wait] and --resubmit-failed RUN [--wait]: a launch that jobs.json records."""
    from vaultsh.errors import UserError
    from vaultsh.launch import slurm
    from vaultsh.launch import slurmstate as st

    if args.status and args.resubmit_failed:
        raise UserError("give --status or --resubmit-failed, not both")
    _check_interval(args)
    record = st.find_record(args.status or args.resubmit_failed, args.out)
    if args.status and not args.wait:
        for line in st.status_lines(st.status(record, need_slurm=False)):
            print(line)
        return 0
    indices = record.indices()
    if args.resubmit_failed:
        indices = [s.index for s in st.status(record) if s.state == st.FAILED]
        if not indices:
            print(f"no failed worker in {record.path}")
            return 0
        sbatch = slurm.find_sbatch()
        if sbatch is None:
            raise UserError("sbatch not found: cannot resubmit here")
        for i, job in st.resubmit(record, indices, sbatch).items():
            print(f"  worker {i}: resubmitted as job {job}")
        if not args.wait:
            return 0
    return _follow(record, indices, args.interval)


def _follow(record, indices: list[int], interval: float) -> int:
    """Follow indices until done or failed; a table at the end; exit 1 when any failed."""
    from vaultsh.launch import slurmstate as st
    from vaultsh.progress import HeadlessPrinter

    with HeadlessPrinter() as printer:
        statuses = st.follow(record, indices, on_event=printer, log=printer.console.log, interval=interval)
    for line in st.status_lines(statuses):
        print(line)
    failed = [s.index for s in statuses if s.state == st.FAILED]
    if failed:
        print(
            f"{len(failed)} worker(s) failed: {failed}; resume them with: "
            f"vaultsh launch slurm --resubmit-failed {record.out}",
            file=sys.stderr,
        )
        return 1
    print(
        f"all {len(statuses)} worker(s) done -> {record.run_uri}; merge statistics with: vaultsh finalize {record.run_uri}"
    )
    return 0


def _ray(plan, args) -> int:
    import humanize

    from vaultsh.errors import UserError
    from vaultsh.launch import ray as rl

    if args.retries < 0:
        raise UserError(f"--retries: {args.retries} is not allowed (must be >= 0)")
    resources = rl.parse_resources(args.resources)
    if not args.wait:
        name = rl.launch(plan, resources=resources, address=args.address, wait=False, retries=args.retries)
        print(
            f"launched workers {plan.indices[0]}-{plan.indices[-1]} of {plan.run_name} on Ray "
            f"(supervisor actor {name!r}, namespace {rl.NAMESPACE!r}); data -> {plan.store_uri}"
        )
        print(f"follow with: vaultsh inspect {plan.store_uri.rstrip('/')}/{plan.run_name}")
        return 0
    from vaultsh.progress import HeadlessPrinter

    with HeadlessPrinter() as printer:
        results = rl.launch(
            plan, resources=resources, address=args.address, wait=True, retries=args.retries, on_event=printer
        )
    assert not isinstance(results, str)  # with wait=True: the workers' results, not the supervisor's name
    for r in results:
        extra = f": {r.error}" if r.error else ""
        tries = f" after {r.attempts} attempts" if r.attempts > 1 else ""
        print(
            f"worker {r.index}: {r.status}{tries}: {r.batches} batches, {humanize.intcomma(r.tokens)} tokens, "
            f"{r.megabatches} megabatches{extra}"
        )
    failed = [r.index for r in results if r.status == "failed"]
    if failed:
        print(f"{len(failed)} worker(s) failed: {failed}; rerun the same launch to resume them", file=sys.stderr)
        return 1
    print(
        f"all {len(results)} worker(s) done -> {plan.store_uri.rstrip('/')}/{plan.run_name}; "
        f"merge statistics with: vaultsh finalize {plan.store_uri.rstrip('/')}/{plan.run_name}"
    )
    return 0
