"""`vaultsh launch ray|slurm CONFIG --workers N --start I --end J`: one worker per index on a cluster."""

from __future__ import annotations

import sys


def _common(p) -> None:
    p.add_argument("config", help="YAML config (its num_runs is the total number of workers)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="total number of workers; must equal the config's num_runs (default: num_runs)")
    p.add_argument("--start", type=int, default=None, metavar="I", help="first worker index to launch (default 0)")
    p.add_argument("--end", type=int, default=None, metavar="J", help="last worker index to launch, inclusive (default N-1)")
    p.add_argument("--store", default=None, metavar="URI", help="override the config's storage URI")
    p.add_argument("--force", action="store_true", help="let workers continue a run whose config changed")


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    sub = p.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)
    r = sub.add_parser("ray", help="run workers as Ray tasks on an existing (or a new local) Ray cluster",
                       description="Run one worker per index as a Ray task; failed workers are retried and resume.")
    _common(r)
    r.add_argument("--resources", default='{"CPU": 1}', metavar="JSON",
                   help='resources of each worker, e.g. \'{"CPU": 32, "GPU": 2}\' (CPU, GPU, memory or custom)')
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    r.add_argument("--wait", action="store_true", help="wait for every worker, showing their progress here")
    r.add_argument("--retries", type=int, default=2, metavar="N", help="resubmit a failed worker up to N times (default 2)")
    s = sub.add_parser("slurm", help="write sbatch scripts (one per index, or an array job) and submit them",
                       description="Write sbatch scripts and submit them when sbatch exists; records index -> job id.")
    _common(s)
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--gpus", type=int, default=1, help="GPUs per worker (default 1)")
    s.add_argument("--mem", default="250G", help="memory per worker (default 250G)")
    s.add_argument("--cpus", type=int, default=16, help="CPUs per worker (default 16)")
    s.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    s.add_argument("--array", action="store_true", help="one array job instead of one job per index")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPT", help="another #SBATCH option, e.g. --qos=high (repeatable)")
    s.add_argument("--out", default=None, metavar="DIR", help="where scripts, logs and jobs.json go (default ./slurm/RUN_NAME)")
    s.add_argument("--dry-run", action="store_true", help="print the scripts; write and submit nothing")


def run(args) -> int:
    from vaultsh.launch.common import make_plan

    plan = make_plan(args.config, workers=args.workers, start=args.start, end=args.end, store=args.store, force=args.force)
    if args.launcher == "slurm":
        return _slurm(plan, args)
    return _ray(plan, args)


def _slurm(plan, args) -> int:
    from pathlib import Path

    from vaultsh.launch import slurm

    opts = slurm.SlurmOptions(partition=args.partition, gpus=args.gpus, mem=args.mem, cpus=args.cpus, time=args.time,
                              account=args.account, array=args.array, extra=list(args.sbatch),
                              out_dir=Path(args.out).expanduser() if args.out else None)
    jobs = slurm.build_jobs(plan, opts)
    if args.dry_run:
        for job in jobs:
            print(f"# ---- {job.path}")
            print(job.text, end="")
        return 0
    slurm.write_jobs(jobs)
    sbatch = slurm.find_sbatch()
    if sbatch is None:
        print(f"sbatch not found: wrote {len(jobs)} script(s) to {jobs[0].path.parent}; submit them on the cluster with:")
        for job in jobs:
            print(f"  sbatch {job.path}")
        return 0
    try:
        slurm.submit(jobs, sbatch)
    finally:
        if any(j.job_id for j in jobs):
            path = slurm.write_job_map(plan, jobs, args.array)
            print(f"index -> job id map: {path}")
    for i, job_id in slurm.job_map(jobs, args.array).items():
        print(f"  worker {i}: job {job_id}")
    print(f"submitted {len(plan.indices)} worker(s) of {plan.run_name} -> {plan.store_uri}; "
          f"logs in {jobs[0].path.parent / 'logs'}")
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
        print(f"launched workers {plan.indices[0]}-{plan.indices[-1]} of {plan.run_name} on Ray "
              f"(supervisor actor {name!r}, namespace {rl.NAMESPACE!r}); data -> {plan.store_uri}")
        print(f"follow with: vaultsh inspect {plan.store_uri.rstrip('/')}/{plan.run_name}")
        return 0
    from vaultsh.progress import HeadlessPrinter

    with HeadlessPrinter() as printer:
        results = rl.launch(plan, resources=resources, address=args.address, wait=True, retries=args.retries,
                            on_event=printer)
    for r in results:
        extra = f": {r.error}" if r.error else ""
        tries = f" after {r.attempts} attempts" if r.attempts > 1 else ""
        print(f"worker {r.index}: {r.status}{tries}: {r.batches} batches, {humanize.intcomma(r.tokens)} tokens, "
              f"{r.megabatches} megabatches{extra}")
    failed = [r.index for r in results if r.status == "failed"]
    if failed:
        print(f"{len(failed)} worker(s) failed: {failed}; rerun the same launch to resume them", file=sys.stderr)
        return 1
    print(f"all {len(results)} worker(s) done -> {plan.store_uri.rstrip('/')}/{plan.run_name}; "
          f"merge statistics with: vaultsh finalize {plan.store_uri.rstrip('/')}/{plan.run_name}")
    return 0
