"""Slurm: one sbatch script per worker index (or one array job), submitted when `sbatch` exists.

Each job runs `python -m vaultsh collect CONFIG --machine I --store URI --headless`.
`--requeue` lets Slurm requeue a preempted job, and `--signal=B:TERM@120`
sends SIGTERM two minutes before the time limit: the worker finishes the
megabatch in flight, commits and exits, and the requeued job resumes after
that commit (same config, same index).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vaultsh.errors import UserError
from vaultsh.launch.common import LaunchPlan, forwarded_env, ranges

_MEM = re.compile(r"^\d+[KMGT]?$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")
_JOB_ID = re.compile(r"^(\d+)(?:_\d+)?(?:;.*)?$")


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus: int = 1
    mem: str = "250G"
    cpus: int = 16
    time: str | None = None
    account: str | None = None
    array: bool = False
    out_dir: Path | None = None  # scripts, logs and jobs.json (default ./slurm/<run_name>)
    extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--qos=high"

    def check(self) -> None:
        if self.gpus < 0:
            raise UserError(f"--gpus: {self.gpus} is not allowed (must be >= 0)")
        if self.cpus < 1:
            raise UserError(f"--cpus: {self.cpus} is not allowed (must be >= 1)")
        if not _MEM.match(self.mem):
            raise UserError(f"--mem: {self.mem!r} is not a Slurm memory size (e.g. 250G, 64000M)")
        if self.time is not None and not _TIME.match(self.time):
            raise UserError(f"--time: {self.time!r} is not a Slurm time limit (e.g. 48:00:00, 2-00:00:00)")
        for name in ("partition", "account"):
            v = getattr(self, name)
            if v is not None and not _NAME.match(v):
                raise UserError(f"--{name}: {v!r} has characters a Slurm {name} name cannot have")
        for opt in self.extra:
            if not opt.startswith("--") or "\n" in opt or "\r" in opt:
                raise UserError(f"--sbatch: {opt!r} must be one option starting with -- (e.g. --qos=high)")


@dataclass
class SlurmJob:
    """One script to submit: the indices it covers and where it is written."""

    indices: list[int]
    path: Path
    text: str
    job_id: str | None = None


def _directives(plan: LaunchPlan, opts: SlurmOptions, name: str, log: str) -> list[str]:
    lines = [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={log}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={opts.cpus}",
        f"#SBATCH --mem={opts.mem}",
    ]
    if opts.gpus:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    lines += ["#SBATCH --requeue", "#SBATCH --signal=B:TERM@120"]
    lines += [f"#SBATCH {o}" for o in opts.extra]
    return lines


def _script(plan: LaunchPlan, opts: SlurmOptions, directives: list[str], index: str) -> str:
    import shlex

    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(forwarded_env().items()))
    return (
        "#!/bin/bash\n"
        + "\n".join(directives)
        + "\n# written by `vaultsh launch slurm`: one collection worker; rerunning it resumes after its last commit\n"
        + "set -euo pipefail\n"
        + f"cd {shlex.quote(plan.cwd)}\n"
        + env
        + "export PYTHONUNBUFFERED=1\n"
        + f"exec {plan.worker_shell(index)}\n"
    )


def build_jobs(plan: LaunchPlan, opts: SlurmOptions) -> list[SlurmJob]:
    """The sbatch scripts of a launch (nothing is written)."""
    opts.check()
    out = opts.out_dir or Path(plan.cwd) / "slurm" / plan.run_name
    out = out.resolve()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", plan.run_name)
    logs = out / "logs"
    if opts.array:
        name = f"vaultsh-{safe}"
        directives = _directives(plan, opts, name, str(logs / f"{safe}-%a-%A.out"))
        directives.insert(1, f"#SBATCH --array={ranges(plan.indices)}")
        text = _script(plan, opts, directives, "$SLURM_ARRAY_TASK_ID")
        return [SlurmJob(indices=list(plan.indices), path=out / f"{safe}-array.sbatch", text=text)]
    jobs = []
    for i in plan.indices:
        name = f"vaultsh-{safe}-{i}"
        text = _script(plan, opts, _directives(plan, opts, name, str(logs / f"{safe}-{i}-%j.out")), str(i))
        jobs.append(SlurmJob(indices=[i], path=out / f"{safe}-{i}.sbatch", text=text))
    return jobs


def write_jobs(jobs: list[SlurmJob]) -> None:
    for job in jobs:
        job.path.parent.mkdir(parents=True, exist_ok=True)
        (job.path.parent / "logs").mkdir(exist_ok=True)
        job.path.write_text(job.text)
        job.path.chmod(0o755)


def submit(jobs: list[SlurmJob], sbatch: str) -> None:
    """`sbatch --parsable` each script; fills `job_id`. Stops at the first refusal (UserError)."""
    for job in jobs:
        try:
            proc = subprocess.run([sbatch, "--parsable", str(job.path)], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"sbatch {job.path}: {exc}") from None
        out = proc.stdout.strip().splitlines()
        m = _JOB_ID.match(out[-1].strip()) if out else None
        if proc.returncode != 0 or not m:
            reason = (proc.stderr.strip().splitlines() or out or [f"exit status {proc.returncode}"])[-1]
            raise UserError(f"sbatch refused {job.path.name}: {reason}")
        job.job_id = m.group(1)


def job_map(jobs: list[SlurmJob], array: bool) -> dict[str, str]:
    """index -> job id ('<array id>_<index>' for an array job)."""
    out: dict[str, str] = {}
    for job in jobs:
        if job.job_id is None:
            continue
        for i in job.indices:
            out[str(i)] = f"{job.job_id}_{i}" if array else job.job_id
    return out


def write_job_map(plan: LaunchPlan, jobs: list[SlurmJob], array: bool) -> Path:
    path = jobs[0].path.parent / "jobs.json"
    data = {
        "run": plan.run_name, "store": plan.store_uri, "config": str(plan.config_path), "num_runs": plan.num_runs,
        "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"), "jobs": job_map(jobs, array),
    }
    old = {}
    if path.exists():  # keep the ids of earlier launches of other indices
        try:
            old = json.loads(path.read_text()).get("jobs", {})
        except (ValueError, AttributeError):
            old = {}
    data["jobs"] = {**old, **data["jobs"]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def find_sbatch() -> str | None:
    return shutil.which("sbatch")
