"""What a Slurm launch is doing: each index's Slurm state and its commit records.

Slurm's view comes from `scontrol show job` (pending, running and recently
ended jobs, with exit status and restarts), else `sacct` where accounting is
on; the run's commit records decide whether an index's share is done. Used
by `vaultsh launch slurm --wait`, `--status` and `--resubmit-failed`.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vaultsh.errors import NotFoundError, UserError
from vaultsh.events import Event, parse
from vaultsh.launch import slurm as sl
from vaultsh.launch.common import ranges

if TYPE_CHECKING:
    from vaultsh.supervise.watcher import StoreWatcher

PENDING, RUNNING, DONE, FAILED, UNKNOWN = "pending", "running", "done", "failed", "unknown"
STATES = (PENDING, RUNNING, DONE, FAILED, UNKNOWN)
_SLURM_PENDING = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "CONFIGURING",
    "RESIZING",
    "SUSPENDED",
    "SPECIAL_EXIT",
}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED"}
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9:/_]*)=")


class SlurmUnavailable(UserError):
    """scontrol could not answer (no controller, no Slurm here)."""


@dataclass
class SlurmTask:
    """Slurm's view of one job or array task."""

    job_id: str  # '123' or '123_4'
    state: str  # JobState, e.g. RUNNING, FAILED
    exit_code: str = ""  # 'status:signal', e.g. '2:0'
    restarts: int = 0
    reason: str = ""


@dataclass
class TaskStatus:
    """One worker index of a launch: its state and why."""

    index: int
    state: str  # pending, running, done, failed
    job_id: str | None
    slurm: SlurmTask | None
    batches: int
    total: int | None
    log: Path | None
    why: str = ""


@dataclass
class LaunchRecord:
    """A launch as jobs.json records it (written by `vaultsh launch slurm`)."""

    path: Path
    run: str
    store: str
    num_runs: int
    jobs: dict[str, str] = field(default_factory=dict)  # index -> job id
    scripts: dict[str, str] = field(default_factory=dict)  # index -> sbatch script

    @property
    def out(self) -> Path:
        return self.path.parent

    @property
    def run_uri(self) -> str:
        return f"{self.store.rstrip('/')}/{self.run}"

    @classmethod
    def load(cls, path: Path) -> LaunchRecord:
        data = sl.read_job_map(path)
        if not data.get("run") or not data.get("store"):
            raise UserError(f"{path}: not a launch record of `vaultsh launch slurm` (no run or store in it)")
        return cls(
            path=Path(path),
            run=str(data["run"]),
            store=str(data["store"]),
            num_runs=int(data.get("num_runs") or 1),
            jobs=dict(data.get("jobs") or {}),
            scripts=dict(data.get("scripts") or {}),
        )

    def indices(self) -> list[int]:
        return sorted(int(i) for i in self.jobs)

    def log_for(self, index: int) -> Path | None:
        job = self.jobs.get(str(index))
        return sl.log_path(self.out, self.run, index, job) if job else None


def find_record(where: str, out_dir: str | None = None) -> LaunchRecord:
    """The launch record named by a directory, a jobs.json, a config file or a run name."""
    p = Path(where).expanduser()
    candidates = [p / "jobs.json", p] if p.is_dir() or p.name == "jobs.json" else []
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from collector.config import load_config

        run = load_config(p).run_name
        candidates.append(Path(out_dir or Path.cwd() / "slurm" / run) / "jobs.json")
    candidates.append((Path(out_dir) if out_dir else Path.cwd() / "slurm" / where) / "jobs.json")
    for c in candidates:
        if c.is_file():
            return LaunchRecord.load(c.resolve())
    raise UserError(
        f"{where}: no launch record (looked for {', '.join(map(str, dict.fromkeys(candidates)))}); "
        "give the directory `vaultsh launch slurm` wrote (--out), its jobs.json, the config or the run name"
    )


# -- Slurm ---------------------------------------------------------------------------------------
def _fields(line: str) -> dict[str, str]:
    """`Key=value Key2=value two` (one `scontrol -o` line) -> dict; values may hold spaces."""
    marks = list(_FIELD.finditer(line))
    return {
        m.group(1): line[m.end() : marks[k + 1].start() if k + 1 < len(marks) else len(line)].strip()
        for k, m in enumerate(marks)
    }


def _expand(spec: str) -> list[int]:
    """Array task ids: '3', '0-3,5', '1-7%2', '[2-3]' -> the ids."""
    out: list[int] = []
    for part in spec.strip("[]").split("%")[0].split(","):
        a, _, b = part.partition("-")
        if a.isdigit() and (not b or b.isdigit()):
            out += range(int(a), int(b or a) + 1)
    return out


def _tasks_of(f: dict[str, str]) -> list[str]:
    array = f.get("ArrayJobId", "")
    if array.isdigit() and f.get("ArrayTaskId"):
        return [f"{array}_{t}" for t in _expand(f["ArrayTaskId"])]
    return [f["JobId"]] if f.get("JobId") else []


def parse_scontrol(text: str) -> dict[str, SlurmTask]:
    """`scontrol show job -o` output -> job id -> SlurmTask."""
    out = {}
    for line in text.splitlines():
        f = _fields(line)
        for tid in _tasks_of(f):
            restarts = f.get("Restarts", "0")
            out[tid] = SlurmTask(
                tid,
                f.get("JobState", "UNKNOWN"),
                f.get("ExitCode", ""),
                int(restarts) if restarts.isdigit() else 0,
                f.get("Reason", ""),
            )
    return out


def parse_sacct(text: str) -> dict[str, SlurmTask]:
    """`sacct -n -P -X -o JobID,State,ExitCode` output -> job id -> SlurmTask."""
    out = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        jid, state, code = parts[:3]
        base, _, task = jid.partition("_")
        ids = [f"{base}_{t}" for t in _expand(task)] if task else [base]
        for tid in ids:
            out[tid] = SlurmTask(tid, (state.split() or ["UNKNOWN"])[0], code)
    return out


def _call(argv: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def query(job_ids: Iterable[str]) -> dict[str, SlurmTask]:
    """Slurm's view of these jobs: scontrol, else sacct for jobs scontrol has forgotten (absent: unknown)."""
    out: dict[str, SlurmTask] = {}
    forgotten = []
    for base in sorted({j.partition("_")[0] for j in job_ids}):
        proc = _call(["scontrol", "show", "job", "-o", base])
        if proc is not None and proc.returncode == 0:
            out.update(parse_scontrol(proc.stdout))
        elif proc is not None and "invalid job id" in proc.stderr.lower():
            forgotten.append(base)
        else:
            why = proc.stderr.strip().splitlines()[-1] if proc is not None and proc.stderr.strip() else "not available"
            raise SlurmUnavailable(f"scontrol show job {base}: {why}")
    if forgotten:
        proc = _call(["sacct", "-n", "-P", "-X", "-j", ",".join(forgotten), "-o", "JobID,State,ExitCode"])
        if proc is not None and proc.returncode == 0:
            out.update({k: v for k, v in parse_sacct(proc.stdout).items() if k not in out})
    return out


# -- commits ---------------------------------------------------------------------------------------
class CommitView:
    """Committed batches per worker from the run's commit records (only new records are read each time)."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self._watcher: StoreWatcher | None = None

    def progress(self) -> dict[int, tuple[int, int | None]]:
        """index -> (batches committed, batches of its share or None); {} before any worker wrote cfg.json."""
        from vaultsh.supervise.watcher import StoreWatcher

        if self._watcher is None:
            try:
                self._watcher = StoreWatcher(self.run_uri)
            except NotFoundError:
                return {}
        self._watcher.poll_once()
        return {w.index: (w.batches, w.total_batches) for w in self._watcher.snapshot()}


def classify(
    index: int, job_id: str | None, task: SlurmTask | None, batches: int, total: int | None
) -> tuple[str, str]:
    """(state, why) of one index from Slurm's view and its committed batches."""
    st = task.state if task else None
    if task is not None and st in _SLURM_PENDING:
        return PENDING, f"{st} ({task.reason})" if task.reason and task.reason != "None" else st
    if st in _SLURM_RUNNING:
        return RUNNING, st
    if total is not None and batches >= total:
        return DONE, "every batch of its share is committed"
    if st == "COMPLETED":
        if total is None:
            return DONE, "exit status 0"
        return FAILED, f"exited 0 with {batches}/{total} batches committed (stopped early; a resubmit resumes it)"
    if task is not None:
        return FAILED, f"{st}, exit status {task.exit_code or '?'}"
    if job_id is None:
        return FAILED, "never submitted"
    return (
        FAILED,
        f"Slurm no longer knows job {job_id} and {batches}/{total if total is not None else '?'} batches are committed",
    )


def status(
    record: LaunchRecord, indices: list[int] | None = None, commits: CommitView | None = None, need_slurm: bool = True
) -> list[TaskStatus]:
    """Every index's state now: Slurm first, then the commit records (a worker commits before it exits).

    Where Slurm cannot be asked (`need_slurm=False`: e.g. on a laptop reading
    the store) an index is done when its share is committed, else unknown.
    """
    indices = record.indices() if indices is None else indices
    try:
        tasks, no_slurm = query(j for i in indices if (j := record.jobs.get(str(i)))), None
    except SlurmUnavailable as exc:
        if need_slurm:
            raise
        tasks, no_slurm = {}, str(exc)
    progress = (commits or CommitView(record.run_uri)).progress()
    out = []
    for i in indices:
        job = record.jobs.get(str(i))
        task = tasks.get(job) if job else None
        batches, total = progress.get(i, (0, None))
        state, why = classify(i, job, task, batches, total)
        if no_slurm and state != DONE:
            state, why = UNKNOWN, f"{batches}/{total if total is not None else '?'} batches committed; {no_slurm}"
        out.append(TaskStatus(i, state, job, task, batches, total, record.log_for(i), why))
    return out


def status_lines(statuses: list[TaskStatus]) -> list[str]:
    """A table: index, state, job, Slurm state, exit status, restarts, committed batches, why."""
    lines = [f"{'index':>5}  {'state':<8} {'job':<12} {'slurm':<11} {'exit':<5} {'restarts':>8}  {'batches':>9}  why"]
    for s in statuses:
        t = s.slurm
        total = s.total if s.total is not None else "?"
        lines.append(
            f"{s.index:>5}  {s.state:<8} {s.job_id or '-':<12} {t.state if t else '-':<11} "
            f"{(t.exit_code if t else '') or '-':<5} {t.restarts if t else 0:>8}  {f'{s.batches}/{total}':>9}  {s.why}"
        )
    counts = {k: [s.index for s in statuses if s.state == k] for k in STATES}
    lines.append("  ".join(f"{k}: {len(v)} ({ranges(v)})" if v else f"{k}: 0" for k, v in counts.items()))
    return lines


# -- following -------------------------------------------------------------------------------------
class EventTail:
    """New events appended to worker `index`'s events file since the tail was made (typed; a line that is not an
    event comes as `Invalid`, for the printer to count and show)."""

    def __init__(self, path: Path, index: int | None = None):
        self.path = path
        self.index = index
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def read(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        events = [e for e in map(parse, lines) if e is not None]
        for e in events:
            if e.worker is None:
                e.worker = self.index
        return events


def describe(s: TaskStatus) -> str:
    """One line about an index: its state, Slurm's state, restarts, why."""
    t = s.slurm
    slurm = f"job {s.job_id} {t.state}" + (f", restart {t.restarts}" if t.restarts else "") if t else f"job {s.job_id}"
    why = f"; {s.why}" if s.why and s.why != (t.state if t else None) else ""
    return f"worker {s.index}: {s.state} ({slurm}{why})"


def failure_lines(s: TaskStatus, n: int = 20) -> list[str]:
    """A failed index: its exit status and the tail of its log."""
    from vaultsh.supervise.process import tail_lines

    code = f"; exit status {(s.slurm.exit_code if s.slurm else '') or '?'}" if "exit status" not in s.why else ""
    lines = [f"worker {s.index} failed: {s.why}{code}; log {s.log}"]
    lines += [f"  | {line}" for line in tail_lines(str(s.log) if s.log else None, n)]
    return lines


def follow(
    record: LaunchRecord,
    indices: list[int],
    on_event: Callable[[Event], None],
    log: Callable[[str], None],
    interval: float = 5.0,
    clock=time.sleep,
) -> list[TaskStatus]:
    """Until every index is done or failed: feed its events to `on_event`, `log` Slurm state changes and failures."""
    tails = [EventTail(sl.events_path(record.out, record.run, i), i) for i in indices]
    commits = CommitView(record.run_uri)
    seen: dict[int, tuple] = {}
    while True:
        for tail in tails:
            for event in tail.read():
                on_event(event)
        try:
            statuses = status(record, indices, commits)
        except SlurmUnavailable as exc:
            log(f"warning: {exc} (retrying)")
            clock(interval)
            continue
        for s in statuses:
            key = (s.state, s.slurm.state if s.slurm else None, s.slurm.restarts if s.slurm else 0)
            if seen.get(s.index) != key:
                seen[s.index] = key
                for line in failure_lines(s) if s.state == FAILED else [describe(s)]:
                    log(line)
        if all(s.state in (DONE, FAILED) for s in statuses):
            for tail in tails:
                for event in tail.read():
                    on_event(event)
            return statuses
        clock(interval)


def resubmit(record: LaunchRecord, indices: list[int], sbatch: str) -> dict[str, str]:
    """Submit these indices again from their scripts (an array script with `--array=` of them); update jobs.json."""
    by_script: dict[str, list[int]] = {}
    for i in indices:
        script = record.scripts.get(str(i))
        if not script or not os.path.isfile(script):
            raise UserError(
                f"worker {i}: its sbatch script {script or '(none recorded)'} is gone; launch it again from the config"
            )
        by_script.setdefault(script, []).append(i)
    jobs = []
    for script, idx in by_script.items():
        job = sl.SlurmJob(indices=idx, path=Path(script), text="")
        try:
            sl.submit([job], sbatch, (f"--array={ranges(idx)}",) if sl.is_array(job) else ())
        finally:
            jobs.append(job)
            new = sl.job_map(jobs)
            if new:
                record.jobs.update(new)
                sl.update_job_map(record.path, new)
    return sl.job_map(jobs)
