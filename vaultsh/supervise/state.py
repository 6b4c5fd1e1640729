"""What a run looks like from its workers' events: one `WorkerStatus` per worker.

Pure data: no processes, no threads, no terminal. The supervisor applies
every event to a `WorkerStatus` as it arrives (cheap field updates), and the
views read a snapshot whenever they redraw, so a burst of progress events
collapses into one redraw of the latest values.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass, field

from vaultsh import fmt  # plain number formatting (humanize); no textual

# Display states, in the order a healthy worker goes through them.
QUEUED = "queued"
STARTING = "starting"
LOADING = "loading"
RUNNING = "running"
UPLOADING = "uploading"
PAUSED = "paused"
STOPPING = "stopping"
DONE = "done"
STOPPED = "stopped"
FAILED = "failed"
WAITING = "waiting"  # watch mode: no commit seen yet
IDLE = "idle"  # watch mode: no new commit for a while

ACTIVE = frozenset({STARTING, LOADING, RUNNING, UPLOADING, PAUSED, STOPPING})
ENDED = frozenset({DONE, STOPPED, FAILED})

LOG_LINES = 200  # log lines kept per worker


@dataclass
class LogLine:
    """A warning, an error or a supervisor note, numbered in arrival order."""

    seq: int
    time: float
    worker: int | None
    level: str  # "info", "warning", "error"
    message: str
    origin: str = "supervisor"  # "event" when a worker's own warning/error/resume event said it


@dataclass
class WorkerStatus:
    """Everything the views show about one worker."""

    index: int
    state: str = QUEUED
    detail: str = ""  # e.g. what is loading
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None  # supervisor clock
    ended_at: float | None = None
    exit_code: int | None = None
    # progress
    batches: int = 0
    total_batches: int | None = None
    tokens: int = 0
    tokens_per_s: float = 0.0
    megabatch: int = 0
    last_progress_time: float | None = None  # the worker's own event time (for latency)
    # commits
    committed: int = 0
    committed_tokens: int = 0
    committed_bytes: int = 0
    # upload queue
    queued: int = 0
    in_flight_bytes: int = 0
    done_bytes: int = 0
    mb_per_s: float = 0.0
    retries: int = 0
    upload_failed: int = 0
    # memory (bytes); rss from psutil in the supervisor, gpu from the worker's events
    rss: int | None = None
    children_rss: int | None = None
    gpu_allocated: int | None = None
    gpu_reserved: int | None = None
    # problems
    warnings: int = 0
    errors: int = 0
    last_error: str | None = None
    done_status: str | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    log_path: str | None = None
    _before_pause: str | None = None
    # milestones: the worker's own event times (its clock) of its start and model load
    _started_event: float | None = None
    _loading_model_since: float | None = None
    _first_batch_seen: bool = False

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float | None:
        if not self.total_batches:
            return None
        return min(1.0, self.batches / self.total_batches)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current token rate (None while unknown)."""
        if self.state not in (RUNNING, UPLOADING) or not self.total_batches or not self.batches:
            return None
        if self.tokens_per_s <= 0 or self.tokens <= 0:
            return None
        left = max(0, self.total_batches - self.batches)
        return left * (self.tokens / self.batches) / self.tokens_per_s

    def memory_total(self) -> int | None:
        if self.rss is None:
            return None
        return self.rss + (self.children_rss or 0)


class EventLog:
    """All log lines of a run (warnings, errors, supervisor notes), numbered."""

    def __init__(self, maxlen: int = 2000):
        self.lines: deque[LogLine] = deque(maxlen=maxlen)
        self.seq = 0

    def add(self, time: float, worker: int | None, level: str, message: str, origin: str = "supervisor") -> LogLine:
        self.seq += 1
        line = LogLine(self.seq, time, worker, level, message, origin)
        self.lines.append(line)
        return line

    def since(self, seq: int) -> list[LogLine]:
        """Lines numbered after `seq` (oldest first)."""
        if not self.lines or self.lines[-1].seq <= seq:
            return []
        return [line for line in self.lines if line.seq > seq]


def apply_event(w: WorkerStatus, event: dict, log: EventLog, now: float) -> None:
    """Update `w` from one worker event (collector/events.py); milestones, warnings and errors go to `log`."""
    _update(w, event, log, now)
    message = milestone(w, event)
    if message:
        w.log.append(log.add(now, w.index, "info", message, "event"))


def milestone(w: WorkerStatus, event: dict) -> str | None:
    """The events pane's line for a healthy run's step (start, model loaded, first batch, commit, done), or None."""
    kind, t = event.get("type"), _float(event.get("time"), None)
    if kind == "start":
        w._started_event, w._first_batch_seen = t, False
        return f"started (pid {event.get('pid', '?')}): {event.get('n_batches', '?')} batches to collect"
    if kind == "loading" and event.get("what") == "model":
        w._loading_model_since = t
        return f"loading model {event.get('detail') or ''}".rstrip()
    if kind == "loading" and "model_bytes" in event:
        took = _since(w._loading_model_since, t)
        return (f"model loaded: {fmt.count(_int(event.get('model_params'), 0))} parameters, "
                f"{fmt.size(_int(event.get('model_bytes'), 0))} {event.get('dtype', '')} on {event.get('device', '?')}"
                + (f" in {took}" if took else ""))
    if kind == "progress" and not w._first_batch_seen:
        w._first_batch_seen = True
        took = _since(w._started_event, t)
        return f"first batch done ({_int(event.get('tokens'), 0):,} tokens so far)" + (f", {took} after start" if took else "")
    if kind == "committed":
        return (f"megabatch {event.get('megabatch')} committed: {fmt.size(_int(event.get('bytes'), 0))}, "
                f"{_int(event.get('tokens'), 0):,} tokens (batches {event.get('batch_start')}-"
                f"{_int(event.get('batch_end'), 0) - 1})")
    if kind == "done":
        return _done_line(event)
    return None


def _done_line(event: dict) -> str:
    status = str(event.get("status", ""))
    totals = (f"{_int(event.get('batches'), 0)} batches, {_int(event.get('tokens'), 0):,} tokens, "
              f"{_int(event.get('megabatches'), 0)} megabatches")
    if event.get("already_complete"):
        return f"already complete: {totals}; nothing to do"
    elapsed = _float(event.get("elapsed"), None)
    took = f" in {_duration(elapsed)}" if elapsed is not None else ""
    if status == "complete":
        return f"finished: {totals}{took}; statistics written"
    if status == "stopped":
        return f"stopped: {totals} committed{took}; statistics written"
    return f"ended ({status or 'unknown'}): {totals} committed{took}"


def _update(w: WorkerStatus, event: dict, log: EventLog, now: float) -> None:
    kind = event.get("type")
    held = w.state in (PAUSED, STOPPING)  # set by the supervisor; events do not override them

    def set_state(state: str) -> None:
        if held:
            w._before_pause = state if w.state == PAUSED else w._before_pause
        else:
            w.state = state

    if kind == "start":
        set_state(STARTING)
        w.total_batches = _int(event.get("n_batches"), w.total_batches)
        w.pid = _int(event.get("pid"), w.pid)
    elif kind == "loading":
        set_state(LOADING)
        w.detail = f"{event.get('what', '')}"
    elif kind == "resume":
        w.batches = _int(event.get("from_batch"), w.batches)
        w.committed = _int(event.get("from_megabatch"), w.committed)
        line = log.add(now, w.index, "info", f"resuming at megabatch {w.committed} (batch {w.batches})", "event")
        w.log.append(line)
    elif kind == "progress":
        w.batches = _int(event.get("batches"), w.batches)
        w.total_batches = _int(event.get("total_batches"), w.total_batches)
        w.tokens = _int(event.get("tokens"), w.tokens)
        w.tokens_per_s = _float(event.get("tokens_per_s"), w.tokens_per_s)
        w.megabatch = _int(event.get("megabatch"), w.megabatch)
        w.last_progress_time = _float(event.get("time"), None)
        w.detail = ""
        finished = w.total_batches is not None and w.batches >= w.total_batches
        set_state(UPLOADING if finished else RUNNING)
    elif kind == "upload":
        w.queued = _int(event.get("queued"), w.queued)
        w.in_flight_bytes = _int(event.get("in_flight_bytes"), w.in_flight_bytes)
        w.done_bytes = _int(event.get("done_bytes"), w.done_bytes)
        w.mb_per_s = _float(event.get("mb_per_s"), w.mb_per_s)
        w.retries = _int(event.get("retries"), w.retries)
        w.upload_failed = _int(event.get("failed"), w.upload_failed)
    elif kind == "memory":
        w.gpu_allocated = _int(event.get("gpu_allocated"), None)
        w.gpu_reserved = _int(event.get("gpu_reserved"), None)
        if w.rss is None:  # psutil in the supervisor is fresher; use the worker's until it has one
            w.rss = _int(event.get("rss"), None)
            w.children_rss = _int(event.get("children_rss"), None)
    elif kind == "committed":
        w.committed = max(w.committed, _int(event.get("megabatch"), -1) + 1)
        w.committed_tokens += _int(event.get("tokens"), 0)
        w.committed_bytes += _int(event.get("bytes"), 0)
    elif kind in ("warning", "error"):
        message = _one_line(event.get("message", ""))
        w.log.append(log.add(now, w.index, kind, message, "event"))
        if kind == "warning":
            w.warnings += 1
        else:
            w.errors += 1
            w.last_error = message
    elif kind == "stopping":  # the worker saw a stop request (ours, or a signal from elsewhere: Slurm, kill)
        w.state = STOPPING
        w._before_pause = None
        mb, filled, per = (_int(event.get(k), 0) for k in ("megabatch", "filled", "batches_per_upload"))
        line = log.add(now, w.index, "info", f"stopping: finishing megabatch {mb} ({filled}/{per} batches), then exit",
                       "event")
        w.log.append(line)
    elif kind == "done":
        status = str(event.get("status", ""))
        w.done_status = status
        w.batches = _int(event.get("batches"), w.batches)
        w.tokens = _int(event.get("tokens"), w.tokens)
        w.tokens_per_s = 0.0
        w.state = {"complete": DONE, "stopped": STOPPED}.get(status, FAILED)
        w.ended_at = now


def exit_status(w: WorkerStatus, code: int, now: float, last_log_line: str | None) -> None:
    """The worker process ended with `code` (Popen's returncode): settle its final state."""
    w.exit_code = code
    w.tokens_per_s = 0.0
    if w.ended_at is None:
        w.ended_at = now
    clean = code == 0 and w.done_status in ("complete", "stopped")
    if clean:
        w.state = DONE if w.done_status == "complete" else STOPPED
        return
    if w.state != FAILED or not w.last_error:
        reason = describe_exit(code)
        if w.done_status == "stopped" and code == 130:
            w.state = STOPPED  # a second stop request: it left at once, uncommitted work dropped
            return
        if not w.last_error:
            w.last_error = f"{reason}: {last_log_line}" if last_log_line and code > 0 else reason
    w.state = FAILED


def describe_exit(code: int) -> str:
    """'exited with code 1', 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _since(t0: float | None, t1: float | None) -> str | None:
    return _duration(t1 - t0) if t0 is not None and t1 is not None and t1 >= t0 else None


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 10 else fmt.duration(s)


def _int(v, default):
    if isinstance(v, bool):
        return default
    if isinstance(v, (int, float)):
        return int(v)
    return default


def _float(v, default):
    if isinstance(v, bool):
        return default
    if isinstance(v, (int, float)):
        return float(v)
    return default


def _one_line(text) -> str:
    text = " ".join(str(text).split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:2000]
