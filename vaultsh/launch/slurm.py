"""Slurm: one sbatch script per worker index (or one array job), submitted when `sbatch` exists.

Each job runs `python -m vaultsh collect CONFIG --machine I --store URI --events-fd 3`
with its events appended to `events/RUN-I.ndjson` next to the scripts (what
`--wait` and `--status` read) and its log in `logs/`. Jobs are `--requeue`able
and get `--signal=B:USR1@120`: two minutes before the time limit the job
script asks the worker to stop (SIGTERM), the worker commits the megabatch in
flight, and the script requeues the job, which resumes after that commit.
Preemption, `scancel` and `scontrol requeue` send SIGTERM to every process of
the job: the worker does the same, and a requeued job resumes the same way.
docs/slurm.md annotates a generated script.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vaultsh.errors import UserError
from vaultsh.launch.common import LaunchPlan, forwarded_env, ranges

_MEM = re.compile(r"^\d+[KMGT]?$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:+&|*\[\]()-]+$")
_JOB_ID = re.compile(r"^(\d+)(?:_\d+)?(?:;.*)?$")
EVENTS_FD = 3


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus: int = 1
    mem: str = "250G"
    cpus: int = 16
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: str | None = None  # one shell line run before the worker: `module load ...`, `source venv/bin/activate`
    array: bool = False
    out_dir: Path | None = None  # scripts, logs, events and jobs.json (default ./slurm/<run_name>)
    extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--exclusive"
    labels: dict[str, str] = field(default_factory=dict, repr=False)  # option -> where it was set (errors)

    def _label(self, name: str) -> str:
        return self.labels.get(name, f"--{name}")

    def check(self) -> None:
        """Every option, checked before anything is written; a one-line UserError naming it."""
        if self.gpus < 0:
            raise UserError(f"{self._label('gpus')}: {self.gpus} is not allowed (must be >= 0)")
        if self.cpus < 1:
            raise UserError(f"{self._label('cpus')}: {self.cpus} is not allowed (must be >= 1)")
        if not _MEM.match(self.mem):
            raise UserError(f"{self._label('mem')}: {self.mem!r} is not a Slurm memory size (e.g. 250G, 64000M)")
        if self.time is not None and not _TIME.match(self.time):
            raise UserError(
                f"{self._label('time')}: {self.time!r} is not a Slurm time limit (e.g. 48:00:00, 2-00:00:00)"
            )
        for name in ("partition", "account", "qos"):
            v = getattr(self, name)
            if v is not None and not _NAME.match(v):
                raise UserError(f"{self._label(name)}: {v!r} has characters a Slurm {name} name cannot have")
        if self.constraint is not None and not _CONSTRAINT.match(self.constraint):
            raise UserError(
                f"{self._label('constraint')}: {self.constraint!r} is not a Slurm constraint (e.g. a100&ib)"
            )
        if self.setup is not None and ("\n" in self.setup or "\r" in self.setup):
            raise UserError(f"{self._label('setup')}: must be one shell line (join commands with && or ;)")
        for opt in self.extra:
            if not opt.startswith("--") or "\n" in opt or "\r" in opt:
                raise UserError(
                    f"{self._label('sbatch')}: {opt!r} must be one option starting with -- (e.g. --exclusive)"
                )


def options_from(config_block: Any, source: str = "<config>", **flags: Any) -> SlurmOptions:
    """Options from the flags, else the config's `slurm:` block, else the defaults.

    A flag of None means "not given"; `sbatch` lines from the config come
    first, then the flags'.
    """
    names = {f.name for f in fields(SlurmOptions)} - {"labels", "extra"}
    opts = SlurmOptions()
    for name in names:
        flag = flags.get(name)
        conf = getattr(config_block, name, None) if config_block is not None else None
        if flag is not None:
            setattr(opts, name, flag)
        elif conf is not None:
            setattr(opts, name, conf)
            opts.labels[name] = f"{source}: slurm.{name}"
    conf_extra = list(getattr(config_block, "sbatch", None) or [])
    if conf_extra:
        opts.labels["sbatch"] = f"{source}: slurm.sbatch" if not flags.get("extra") else "--sbatch / slurm.sbatch"
    opts.extra = conf_extra + list(flags.get("extra") or [])
    return opts


@dataclass
class SlurmJob:
    """One script to submit: the indices it covers and where it is written."""

    indices: list[int]
    path: Path
    text: str
    job_id: str | None = None


def safe_name(run_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)


def out_dir_for(plan: LaunchPlan, opts: SlurmOptions) -> Path:
    return (opts.out_dir or Path(plan.cwd) / "slurm" / plan.run_name).resolve()


def log_path(out: Path, run_name: str, index: int, job_id: str) -> Path:
    """Where Slurm writes the log of worker `index` in job `job_id` ('123' or array task '123_4')."""
    base, _, _task = job_id.partition("_")
    return out / "logs" / f"{safe_name(run_name)}-{index}-{base}.out"


def events_path(out: Path, run_name: str, index: int) -> Path:
    return out / "events" / f"{safe_name(run_name)}-{index}.ndjson"


def _directives(opts: SlurmOptions, name: str, log: str) -> list[str]:
    lines = [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={opts.cpus}",
        f"#SBATCH --mem={opts.mem}",
    ]
    if opts.gpus:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus}")
    for opt in ("partition", "account", "qos", "constraint", "time"):
        if getattr(opts, opt):
            lines.append(f"#SBATCH --{opt}={getattr(opts, opt)}")
    lines += ["#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]
    lines += [f"#SBATCH {o}" for o in opts.extra]
    return lines


_BODY = r"""
# Resumable: rerunning this script (a requeue, a resubmit) continues after the worker's last commit.
set -uo pipefail
INDEX={index}
echo "vaultsh: worker $INDEX of {run}: job ${{SLURM_JOB_ID:-?}} on $(hostname), restart ${{SLURM_RESTART_COUNT:-0}}, $(date -Is)"
cd {cwd} || exit 2
{setup}{env}export PYTHONUNBUFFERED=1
mkdir -p {events_dir}
stop_requested=0
child=
# Time limit near (--signal=B:USR1@120 reaches only this shell): ask the worker to commit and stop, then requeue.
on_usr1() {{ stop_requested=1; echo "vaultsh: USR1: time limit near, asking worker $INDEX to commit and stop"; [ -n "$child" ] && kill -TERM "$child"; }}
trap on_usr1 USR1
# Preemption, scancel and scontrol requeue signal every process of the job: the worker stops by itself.
trap 'echo "vaultsh: SIGTERM: worker $INDEX stops after the megabatch in flight"' TERM
{worker} {fd}>>{events_dir}/"{safe}-$INDEX.ndjson" &
child=$!
wait "$child"; rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
echo "vaultsh: worker $INDEX exited with status $rc"
if [ "$stop_requested" = 1 ] && [ "$rc" = 0 ] && [ -n "${{SLURM_JOB_ID:-}}" ]; then
  echo "vaultsh: requeueing job $SLURM_JOB_ID: it resumes after its last commit"
  scontrol requeue "$SLURM_JOB_ID" || echo "vaultsh: scontrol requeue failed: resubmit with vaultsh launch slurm --resubmit-failed"
fi
exit "$rc"
"""


def _script(plan: LaunchPlan, opts: SlurmOptions, directives: list[str], index: str, out: Path) -> str:
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(forwarded_env().items()))
    setup = f"{opts.setup}\n" if opts.setup else ""
    body = _BODY.format(
        index=index,
        run=shlex.quote(plan.run_name),
        cwd=shlex.quote(plan.cwd),
        setup=setup,
        env=env,
        events_dir=shlex.quote(str(out / "events")),
        safe=safe_name(plan.run_name),
        fd=EVENTS_FD,
        worker=plan.worker_shell("$INDEX", events_fd=EVENTS_FD),
    )
    return (
        "#!/bin/bash\n" + "\n".join(directives) + "\n# written by `vaultsh launch slurm`: one collection worker" + body
    )


def build_jobs(plan: LaunchPlan, opts: SlurmOptions) -> list[SlurmJob]:
    """The sbatch scripts of a launch (nothing is written)."""
    opts.check()
    out = out_dir_for(plan, opts)
    safe = safe_name(plan.run_name)
    logs = out / "logs"
    if opts.array:
        directives = _directives(opts, f"vaultsh-{safe}", str(logs / f"{safe}-%a-%A.out"))
        directives.insert(1, f"#SBATCH --array={ranges(plan.indices)}")
        text = _script(plan, opts, directives, '"$SLURM_ARRAY_TASK_ID"', out)
        return [SlurmJob(indices=list(plan.indices), path=out / f"{safe}-array.sbatch", text=text)]
    jobs = []
    for i in plan.indices:
        directives = _directives(opts, f"vaultsh-{safe}-{i}", str(logs / f"{safe}-{i}-%j.out"))
        jobs.append(
            SlurmJob(indices=[i], path=out / f"{safe}-{i}.sbatch", text=_script(plan, opts, directives, str(i), out))
        )
    return jobs


def write_jobs(jobs: list[SlurmJob]) -> None:
    for job in jobs:
        for sub in ("logs", "events"):
            (job.path.parent / sub).mkdir(parents=True, exist_ok=True)
        job.path.write_text(job.text)
        job.path.chmod(0o755)


def submit(jobs: list[SlurmJob], sbatch: str, extra_args: tuple[str, ...] = ()) -> None:
    """`sbatch --parsable [extra_args] SCRIPT` for each job; fills `job_id`. Stops at the first refusal (UserError)."""
    for job in jobs:
        try:
            proc = subprocess.run(
                [sbatch, "--parsable", *extra_args, str(job.path)], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"sbatch {job.path}: {exc}") from None
        out = proc.stdout.strip().splitlines()
        m = _JOB_ID.match(out[-1].strip()) if out else None
        if proc.returncode != 0 or not m:
            reason = (proc.stderr.strip().splitlines() or out or [f"exit status {proc.returncode}"])[-1]
            raise UserError(f"sbatch refused {job.path.name}: {reason}")
        job.job_id = m.group(1)


def is_array(job: SlurmJob) -> bool:
    return job.path.name.endswith("-array.sbatch")


def job_map(jobs: list[SlurmJob]) -> dict[str, str]:
    """index -> job id ('<array id>_<index>' for an array job)."""
    out: dict[str, str] = {}
    for job in jobs:
        if job.job_id is None:
            continue
        for i in job.indices:
            out[str(i)] = f"{job.job_id}_{i}" if is_array(job) else job.job_id
    return out


def write_job_map(plan: LaunchPlan, jobs: list[SlurmJob]) -> Path:
    """Record index -> job id and index -> script in jobs.json, merged with earlier launches of other indices."""
    path = jobs[0].path.parent / "jobs.json"
    scripts = {str(i): str(job.path) for job in jobs if job.job_id for i in job.indices}
    base = {"run": plan.run_name, "store": plan.store_uri, "config": str(plan.config_path), "num_runs": plan.num_runs}
    return update_job_map(path, job_map(jobs), scripts, base)


def update_job_map(
    path: Path, jobs: dict[str, str], scripts: dict[str, str] | None = None, base: dict | None = None
) -> Path:
    """Merge new index -> job id (and -> script) entries into jobs.json."""
    data = read_job_map(path) if path.exists() else {}
    data.update(base or {})
    data["submitted"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data["jobs"] = {**data.get("jobs", {}), **jobs}
    data["scripts"] = {**data.get("scripts", {}), **(scripts or {})}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_job_map(path: Path) -> dict:
    """jobs.json as a dict ({} when unreadable: a launch record is a convenience, not the truth)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_sbatch() -> str | None:
    return shutil.which("sbatch")
